{# Generic tests whose failing rows always carry `partition_key`, so the orchestrator can split a
   multi-day result into one result per day. #}

{% test unique_per_partition(model, column_name, partition_column) %}
select {{ partition_column }} as partition_key, {{ column_name }} as unique_field, count(*) as n_records
from {{ model }}
where {{ column_name }} is not null
group by {{ partition_column }}, {{ column_name }}
having count(*) > 1
{% endtest %}

{% test not_null_per_partition(model, column_name, partition_column) %}
select {{ partition_column }} as partition_key, *
from {{ model }}
where {{ column_name }} is null
{% endtest %}

{% test relationships_per_partition(model, column_name, to, field, partition_column) %}
with child as (select * from {{ model }})
select child.{{ partition_column }} as partition_key, child.{{ column_name }} as from_field
from child
left join {{ to }} as parent on child.{{ column_name }} = parent.{{ field }}
where child.{{ column_name }} is not null and parent.{{ field }} is null
{% endtest %}
