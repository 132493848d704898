-- Where the unqualified table names of the replicator's queries resolve on this connection:
-- market live, the namespace's own schema in a replay (temporary tables come first anyway).
SELECT set_config('search_path', quote_ident($1), false)
