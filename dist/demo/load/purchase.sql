-- a shopper buys 1-3 units from one warehouse; the stock decrement and the activity row
-- commit together, and nothing happens when the warehouse cannot cover it (no oversell)
\set r random(1, 100)
-- 85% of the traffic goes to the 24 hot SKUs
\set n CASE WHEN :r <= 85 THEN random(1, 24) ELSE random(25, :skus) END
\set w random(1, 4)
\set u random(1, 5000)
\set q random(1, 3)
WITH d AS (
    UPDATE inventory SET on_hand = on_hand - :q
    WHERE sku = 'SKU-' || lpad(:n::text, 5, '0')
      AND location = (ARRAY['WH-BER','WH-PAR','WH-MAD','WH-WAW'])[:w]
      AND on_hand - reserved >= :q
    RETURNING sku
)
INSERT INTO activity_log (sku, kind, qty, user_id)
SELECT sku, 'purchase', :q, 'user-' || :u FROM d;
