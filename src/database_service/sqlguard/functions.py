"""Which of PostgreSQL's own functions and types a tenant's statement may use.

Deny by default. A function of ``pg_catalog`` is callable only when it is listed here; every
other name PostgreSQL defines (about 2,800 of them) is refused, and so is every function a later
PostgreSQL adds until someone reviews it and lists it. What is listed computes over the values it
is given — numbers, text, times, JSON, arrays, ranges, aggregates, windows — and nothing else:

- no function that plans and runs SQL given as text (``ts_stat``, ``ts_rewrite(tsquery, text)``,
  ``query_to_xml`` and the other ``*_to_xml*``, ``dblink``…): the guard would never see that SQL;
- no function that turns an OID or a name into another object's name or existence
  (``format_type``, ``obj_description``, ``to_regclass``, ``has_*_privilege``, ``pg_get_*``,
  ``row_security_active``…): they enumerate other tenants' schemas and objects;
- no function that reports on the cluster (``pg_stat_*``, ``pg_relation_size``,
  ``pg_current_xact_id``, ``txid_*``, ``pg_current_snapshot``…): figures about every tenant;
- no function that changes or reads session state beyond the statement (``set_config``,
  ``setseed``, ``pg_advisory_*``, ``pg_notify``, ``lo_*``).

``tests/isolation/test_catalog_systematic.py`` enumerates ``pg_proc`` and checks that this list
holds: nothing listed runs SQL text, takes an OID, or resolves a name outside the positions
``NAME_ARGUMENTS`` checks.
"""

from __future__ import annotations

__all__ = ["ALLOWED_FUNCTIONS", "NAME_ARGUMENTS", "NAME_TYPES", "TRANSACTION_ID_TYPES"]


def _words(text: str) -> frozenset[str]:
    return frozenset(
        word for line in text.splitlines() for word in line.split("#", 1)[0].split() if word
    )


ALLOWED_FUNCTIONS = _words(
    """
    # aggregates
    any_value array_agg avg bit_and bit_or bit_xor bool_and bool_or corr count covar_pop
    covar_samp every json_agg json_agg_strict json_object_agg json_object_agg_strict
    json_object_agg_unique json_object_agg_unique_strict jsonb_agg jsonb_agg_strict
    jsonb_object_agg jsonb_object_agg_strict jsonb_object_agg_unique
    jsonb_object_agg_unique_strict max min mode percentile_cont percentile_disc range_agg
    range_intersect_agg regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx
    regr_sxy regr_syy stddev stddev_pop stddev_samp string_agg sum var_pop var_samp variance
    xmlagg
    # window functions
    cume_dist dense_rank first_value lag last_value lead nth_value ntile percent_rank rank
    row_number
    # mathematics
    abs acos acosd acosh asin asind asinh atan atan2 atan2d atand atanh cbrt ceil ceiling cos
    cosd cosh cot cotd degrees div erf erfc exp factorial floor gamma gcd lcm lgamma ln log log10
    min_scale mod pi pow power radians random random_normal round scale sign sin sind sinh sqrt
    tan tand tanh trim_scale trunc width_bucket
    # strings and bytes
    ascii bit_count bit_length btrim casefold char_length character_length chr concat concat_ws
    convert convert_from convert_to crc32 crc32c decode encode format get_bit get_byte initcap
    is_normalized left length like like_escape lower lpad ltrim md5 normalize notlike
    octet_length overlay parse_ident position quote_ident quote_literal quote_nullable
    regexp_count regexp_instr regexp_like regexp_match regexp_matches regexp_replace
    regexp_split_to_array regexp_split_to_table regexp_substr repeat replace reverse right rpad
    rtrim set_bit set_byte sha224 sha256 sha384 sha512 similar_escape similar_to_escape
    split_part starts_with string_to_array string_to_table strpos substr substring textlen
    to_ascii to_bin to_hex to_oct translate unicode_assigned unicode_version unistr upper
    icu_unicode_version getdatabaseencoding
    # formatting
    to_char to_date to_number to_timestamp cash_words
    # date and time
    age clock_timestamp date_add date_bin date_part date_subtract date_trunc extract isfinite
    justify_days justify_hours justify_interval make_date make_interval make_time make_timestamp
    make_timestamptz now overlaps statement_timestamp timeofday timezone transaction_timestamp
    # conversions named after their type
    bit bool bpchar char date float4 float8 int2 int4 int8 interval money numeric text time
    timestamp timestamptz timetz varbit varchar xml cidr macaddr macaddr8
    # ranges and multiranges
    daterange datemultirange int4multirange int4range int8multirange int8range isempty lower_inc
    lower_inf multirange nummultirange numrange range_merge tsmultirange tsrange tstzmultirange
    tstzrange upper_inc upper_inf
    # arrays
    array_append array_dims array_fill array_length array_lower array_ndims array_position
    array_positions array_prepend array_remove array_replace array_reverse array_sample
    array_shuffle array_sort array_to_string array_upper cardinality generate_series
    generate_subscripts trim_array unnest
    # enums
    enum_first enum_last enum_range
    # JSON
    array_to_json json_array_elements json_array_elements_text json_array_length
    json_build_array json_build_object json_each json_each_text json_extract_path
    json_extract_path_text json_object json_object_keys json_populate_record
    json_populate_recordset json_strip_nulls json_to_record json_to_recordset json_typeof
    jsonb_array_elements jsonb_array_elements_text jsonb_array_length jsonb_build_array
    jsonb_build_object jsonb_each jsonb_each_text jsonb_extract_path jsonb_extract_path_text
    jsonb_insert jsonb_object jsonb_object_keys jsonb_path_exists jsonb_path_exists_tz
    jsonb_path_match jsonb_path_match_tz jsonb_path_query jsonb_path_query_array
    jsonb_path_query_array_tz jsonb_path_query_first jsonb_path_query_first_tz
    jsonb_path_query_tz jsonb_populate_record jsonb_populate_record_valid
    jsonb_populate_recordset jsonb_pretty jsonb_set jsonb_set_lax jsonb_strip_nulls
    jsonb_to_record jsonb_to_recordset jsonb_typeof row_to_json to_json to_jsonb
    # text search (the configuration argument is a checked name, see NAME_ARGUMENTS)
    array_to_tsvector get_current_ts_config json_to_tsvector jsonb_to_tsvector numnode
    phraseto_tsquery plainto_tsquery querytree setweight strip to_tsquery to_tsvector ts_delete
    ts_filter ts_headline ts_rank ts_rank_cd tsquery_phrase tsvector_to_array
    websearch_to_tsquery
    # XML (the constructors are syntax, not calls)
    xml_is_well_formed xml_is_well_formed_content xml_is_well_formed_document xmlcomment xmltext
    xpath xpath_exists
    # UUIDs
    gen_random_uuid uuid_extract_timestamp uuid_extract_version uuidv4 uuidv7
    # geometry and networks
    area bound_box box center circle diagonal diameter height isclosed ishorizontal isopen
    isparallel isperp isvertical line lseg npoints path pclose point polygon popen radius slope
    width abbrev broadcast family host hostmask inet_merge inet_same_family masklen netmask
    network set_masklen macaddr8_set7bit
    # sequences (the sequence argument is a checked name, see NAME_ARGUMENTS)
    nextval currval setval lastval
    # the session's own facts, and values of its own
    current_database current_schema current_schemas current_user session_user system_user
    current_setting version num_nonnulls num_nulls pg_typeof pg_column_size pg_size_pretty
    pg_size_bytes pg_collation_for pg_sleep pg_sleep_for pg_sleep_until
    """
)

# OID alias types: their input functions look a name up in the catalog (any schema), and their
# output functions turn an OID into a name. A value of these types is allowed only as a string
# constant naming an object of the tenant's own schema, the shared schema or pg_catalog.
NAME_TYPES = frozenset(
    {
        "regclass", "regcollation", "regconfig", "regdictionary", "regnamespace", "regoper",
        "regoperator", "regproc", "regprocedure", "regrole", "regtype",
    }
)  # fmt: skip
# Transaction and tuple ids: reading them back (``age('3'::xid)``) measures every tenant's writes.
TRANSACTION_ID_TYPES = frozenset({"xid", "xid8", "cid", "tid", "txid_snapshot", "pg_snapshot"})

# (function, number of arguments) → argument positions of an OID alias type, for the allowed
# functions that have one. Such an argument must be a string constant the guard can check (or
# a cast of one); a parameter or a column there would be resolved by PostgreSQL in any schema.
NAME_ARGUMENTS: dict[tuple[str, int], frozenset[int]] = {
    ("nextval", 1): frozenset({0}),
    ("currval", 1): frozenset({0}),
    ("setval", 2): frozenset({0}),
    ("setval", 3): frozenset({0}),
    ("to_tsvector", 2): frozenset({0}),
    ("to_tsquery", 2): frozenset({0}),
    ("plainto_tsquery", 2): frozenset({0}),
    ("phraseto_tsquery", 2): frozenset({0}),
    ("websearch_to_tsquery", 2): frozenset({0}),
    ("ts_headline", 3): frozenset({0}),
    ("ts_headline", 4): frozenset({0}),
    ("json_to_tsvector", 3): frozenset({0}),
    ("jsonb_to_tsvector", 3): frozenset({0}),
}
