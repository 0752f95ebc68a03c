// The version of the op schemas this build implements. sparse_ops/ops/_extension.py reads the marker
// string from the binary before loading it and refuses a build whose version differs from
// sparse_ops.ops.SCHEMA_VERSION: loading kernels registered against an older schema would abort
// the process inside dlopen. Bump both numbers together whenever a schema in sparse_ops/ops/__init__.py changes.
#define SPARSE_OPS_SCHEMA_VERSION "7"

extern "C" {
__attribute__((used, visibility("default"))) const char sparse_ops_schema_version_marker[] =
    "sparse_ops_schema_version=" SPARSE_OPS_SCHEMA_VERSION ";";
}
