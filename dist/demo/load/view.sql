-- a shopper opens a product page
\set r random(1, 100)
-- 85% of the traffic goes to the 24 hot SKUs
\set n CASE WHEN :r <= 85 THEN random(1, 24) ELSE random(25, :skus) END
\set w random(1, 4)
\set u random(1, 5000)
INSERT INTO activity_log (sku, kind, qty, user_id)
VALUES ('SKU-' || lpad(:n::text, 5, '0'), 'view', 1, 'user-' || :u);
