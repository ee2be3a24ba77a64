{# Rows whose value is not positive, with the partition column as partition_key. #}
{% test positive_per_partition(model, column_name, partition_column) %}
select {{ partition_column }} as partition_key, {{ column_name }} as value
from {{ model }}
where {{ column_name }} <= 0
{% endtest %}
