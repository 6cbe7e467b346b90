-- skusync demo schema: a small shop's inventory database.
CREATE TABLE public.products (
    sku   text PRIMARY KEY,
    name  text,
    price numeric(10,2)
);

CREATE TABLE public.inventory (
    sku       text,
    location  text,
    on_hand   int,
    reserved  int,
    low_stock int,
    PRIMARY KEY (sku, location)
);

CREATE TABLE public.activity_log (
    id      bigserial PRIMARY KEY,
    sku     text,
    kind    text,
    qty     int,
    user_id text,
    at      timestamptz DEFAULT now()
);
CREATE INDEX activity_log_at ON public.activity_log (at);
