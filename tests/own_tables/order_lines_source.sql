-- The source the example reads: ~3 years of order lines, 1 to 7 lines per order, deterministic.
CREATE SCHEMA IF NOT EXISTS legacy;
CREATE TABLE legacy.order_lines (
    order_no bigint NOT NULL,
    line_no integer NOT NULL,
    ship_date date NOT NULL,
    ship_mode text NOT NULL,
    quantity integer NOT NULL,
    extended_price numeric(12, 2) NOT NULL,
    discount numeric(4, 2) NOT NULL,
    PRIMARY KEY (order_no, line_no)
);
INSERT INTO legacy.order_lines
SELECT o AS order_no,
       l AS line_no,
       date '1994-12-01' + ((o * 7 + l * 3) % 800) AS ship_date,
       (ARRAY['rail', 'air', 'mail', 'ship', 'truck'])[1 + (o + l) % 5] AS ship_mode,
       1 + (o * l) % 50 AS quantity,
       round((900 + (o * 31 + l * 17) % 100000 / 1.7)::numeric, 2) AS extended_price,
       ((o + l) % 11) / 100.0 AS discount
FROM generate_series(1, 3000) AS o,
     generate_series(1, 7) AS l
WHERE l <= 1 + o % 7;
-- The window column is what every partition's SELECT filters on.
CREATE INDEX ON legacy.order_lines (ship_date);
ANALYZE legacy.order_lines;
