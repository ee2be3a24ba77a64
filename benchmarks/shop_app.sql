-- The application, as pgbench plays it (benchmarks/live_latency.py): a new order, a random order
-- marked shipped, a customer's ten latest orders. :first_order, :last_order and :customers come
-- from the seeded data (-D); new orders get ids far above the seeded ones.
\set cid random(1, :customers)
\set oid random(:first_order, :last_order)
\set new_id random(5000000000, 9000000000)
BEGIN;
INSERT INTO app.orders (order_id, customer_id, ordered_at, arrived_at, status, net_amount,
    tax_amount, sales_channel)
    VALUES (:new_id, :cid, now(), now(), 'new', 10.00, 1.90, 'web') ON CONFLICT DO NOTHING;
UPDATE app.orders SET status = 'shipped' WHERE order_id = :oid;
SELECT order_id, ordered_at, net_amount FROM app.orders WHERE customer_id = :cid
    ORDER BY ordered_at DESC LIMIT 10;
END;
