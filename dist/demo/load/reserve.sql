-- the warehouse reserves one unit for a pending order, or releases one
\set r random(1, 100)
-- 85% of the traffic goes to the 24 hot SKUs
\set n CASE WHEN :r <= 85 THEN random(1, 24) ELSE random(25, :skus) END
\set w random(1, 4)
\set u random(1, 5000)
\set up random(0, 1)
UPDATE inventory
SET reserved = CASE WHEN :up = 1 THEN reserved + 1 ELSE reserved - 1 END
WHERE sku = 'SKU-' || lpad(:n::text, 5, '0')
  AND location = (ARRAY['WH-BER','WH-PAR','WH-MAD','WH-WAW'])[:w]
  AND CASE WHEN :up = 1 THEN on_hand - reserved >= 1 ELSE reserved >= 1 END;
