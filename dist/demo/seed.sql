-- skusync demo catalogue: :skus products (SKU-00001 ...) stocked in four warehouses.
-- SKU-00001 .. SKU-00024 are the "hot" products the load generator concentrates on;
-- they start with little stock so low-stock alerts show up within a minute.
SELECT setseed(0.42);

INSERT INTO public.products (sku, name, price)
SELECT 'SKU-' || lpad(i::text, 5, '0'),
       (ARRAY['Classic','Organic','Wireless','Compact','Deluxe','Vintage','Smart','Ultra',
              'Eco','Travel','Pro','Mini','Rugged','Silent','Nordic','Urban'])[1 + (i * 7) % 16]
       || ' ' ||
       (ARRAY['Coffee Grinder','Desk Lamp','Backpack','Headphones','Water Bottle','Sneakers',
              'Kettle','Yoga Mat','Notebook','Bluetooth Speaker','Rain Jacket','Chef Knife',
              'Phone Case','Wall Clock','Tea Set','Bike Light','Sunglasses','Blender',
              'Wool Scarf','Cutting Board'])[1 + (i * 13) % 20]
       || CASE WHEN i > 320 THEN ' ' || chr(65 + i % 26) || (i % 9 + 1)::text ELSE '' END,
       round((4.99 + random() * 195)::numeric, 2)
FROM generate_series(1, :skus) AS i;

INSERT INTO public.inventory (sku, location, on_hand, reserved, low_stock)
SELECT p.sku, w.loc,
       CASE WHEN p.sku <= 'SKU-00024' THEN 2 + floor(random() * 11)::int
            ELSE 10 + floor(random() * 240)::int END,
       CASE WHEN random() < 0.3 THEN floor(random() * 3)::int ELSE 0 END,
       CASE WHEN p.sku <= 'SKU-00024' THEN 12 ELSE 20 END
FROM public.products p
CROSS JOIN (VALUES ('WH-BER'), ('WH-PAR'), ('WH-MAD'), ('WH-WAW')) AS w(loc);

-- some history so the windows are not empty at start
INSERT INTO public.activity_log (sku, kind, qty, user_id, at)
SELECT 'SKU-' || lpad((1 + floor(random() * random() * 60))::int::text, 5, '0'),
       (ARRAY['view','view','view','view','add_to_cart'])[1 + floor(random() * 5)::int],
       1, 'user-' || floor(random() * 5000)::int,
       now() - random() * interval '4 minutes'
FROM generate_series(1, 2000);

ANALYZE;
