-- Demo inventory schema for skusync (dist/skusync.toml maps it).
-- Run as the database owner before sql/setup.sql.

CREATE TABLE IF NOT EXISTS public.products (
    sku   text PRIMARY KEY,
    name  text NOT NULL,
    price numeric(10,2)
);

-- Stock per SKU and location: absolute quantities (publish everything).
CREATE TABLE IF NOT EXISTS public.inventory (
    sku       text NOT NULL,
    location  text NOT NULL,
    on_hand   int  NOT NULL DEFAULT 0,
    reserved  int  NOT NULL DEFAULT 0,
    low_stock int,
    PRIMARY KEY (sku, location)
);

-- Append-only activity log: views, add_to_cart, purchase (publish inserts only).
CREATE TABLE IF NOT EXISTS public.activity_log (
    id      bigserial PRIMARY KEY,
    sku     text NOT NULL,
    kind    text NOT NULL,
    qty     int,
    user_id text,
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS activity_log_at ON public.activity_log (at);
