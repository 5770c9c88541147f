"""The engine: captures in, completed streams out (read, decode, flow table, reassembly, timer
wheel, stream records, the offline pipeline). Imports nothing above it but `streamtap.config`
and `streamtap.errors`; the hot-path modules are compiled (`compiled.COMPILED_MODULES`)."""
