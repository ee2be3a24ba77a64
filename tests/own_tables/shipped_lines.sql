-- Order lines shipped in the window; the price the customer paid after the line's discount.
SELECT l.order_no,
       l.line_no,
       l.ship_date,
       upper(l.ship_mode) AS ship_mode,
       l.quantity,
       round(l.extended_price * (1 - l.discount), 2) AS net_price
FROM legacy.order_lines AS l
WHERE l.ship_date >= %(start)s
  AND l.ship_date < %(end)s
