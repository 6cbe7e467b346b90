-- a delivery arrives: 15-50 units for one of the emptiest hot rows
\set q random(15, 50)
UPDATE inventory SET on_hand = on_hand + :q
WHERE (sku, location) = (
    SELECT sku, location FROM inventory
    WHERE sku BETWEEN 'SKU-00001' AND 'SKU-00024'
    ORDER BY on_hand - reserved + random() * 8
    LIMIT 1);
