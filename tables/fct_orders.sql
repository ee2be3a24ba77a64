-- One row per order placed on the partition's days (UTC).
-- Orders from before the sales_channel column existed (2024-03-01) were all placed on the web shop.
SELECT o.order_id,
       (o.ordered_at AT TIME ZONE 'UTC')::date AS order_day,
       o.customer_id,
       c.country,
       coalesce(o.sales_channel, 'web') AS sales_channel,
       o.status,
       o.net_amount,
       o.tax_amount,
       o.net_amount + o.tax_amount AS gross_amount
FROM app.orders AS o
LEFT JOIN app.customers AS c ON c.customer_id = o.customer_id
WHERE o.ordered_at >= %(start)s::timestamp AT TIME ZONE 'UTC'
  AND o.ordered_at < %(end)s::timestamp AT TIME ZONE 'UTC'
