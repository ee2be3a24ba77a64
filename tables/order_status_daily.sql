-- Orders per day (UTC), customer country and status; a customer without a country is 'unknown'.
SELECT (o.ordered_at AT TIME ZONE 'UTC')::date AS order_day,
       coalesce(c.country, 'unknown') AS country,
       o.status,
       count(*) AS orders,
       sum(o.net_amount) AS net_amount
FROM app.orders AS o
LEFT JOIN app.customers AS c ON c.customer_id = o.customer_id
WHERE o.ordered_at >= %(start)s::timestamp AT TIME ZONE 'UTC'
  AND o.ordered_at < %(end)s::timestamp AT TIME ZONE 'UTC'
GROUP BY 1, 2, 3
