-- a checkout that fails half-way: rolled back, so skusync never sees it
\set r random(1, 100)
-- 85% of the traffic goes to the 24 hot SKUs
\set n CASE WHEN :r <= 85 THEN random(1, 24) ELSE random(25, :skus) END
\set w random(1, 4)
\set u random(1, 5000)
BEGIN;
UPDATE inventory SET on_hand = 0
WHERE sku = 'SKU-' || lpad(:n::text, 5, '0')
  AND location = (ARRAY['WH-BER','WH-PAR','WH-MAD','WH-WAW'])[:w];
INSERT INTO activity_log (sku, kind, qty, user_id)
VALUES ('SKU-' || lpad(:n::text, 5, '0'), 'purchase', 999, 'user-' || :u);
ROLLBACK;
