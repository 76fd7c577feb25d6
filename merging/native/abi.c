/* What the parameter structs of kernels.h look like in this build, for merging/native/abi.py to check against
 * its ctypes mirrors before any kernel is called (a mismatch means the kernels are not used). */
#include <stddef.h>
#include <string.h>

#include "kernels.h"

/* Expanded from the same field lists as the typedefs in kernels.h, so the table cannot drift from the structs. */
typedef struct {
    const char *name;
    size_t offset, size;
} field_layout;

typedef struct {
    const char *name;
    size_t size;
    const field_layout *fields;
    int count;
} struct_layout;

#define MS_FIELD_LAYOUT(type, name) {#name, offsetof(MS_THIS, name), sizeof(((MS_THIS *)0)->name)},
#define MS_FIELDS(list) static const field_layout list##_layout[] = {list(MS_FIELD_LAYOUT)};

#define MS_THIS ms_weighted_sum_args
MS_FIELDS(MS_WEIGHTED_SUM_ARGS)
#undef MS_THIS
#define MS_THIS ms_task_vectors_args
MS_FIELDS(MS_TASK_VECTORS_ARGS)
#undef MS_THIS
#define MS_THIS ms_magnitude_args
MS_FIELDS(MS_MAGNITUDE_ARGS)
#undef MS_THIS
#define MS_THIS ms_bracket_found
MS_FIELDS(MS_BRACKET_FOUND)
#undef MS_THIS
#define MS_THIS ms_random_l1_args
MS_FIELDS(MS_RANDOM_L1_ARGS)
#undef MS_THIS
#define MS_THIS ms_emr_args
MS_FIELDS(MS_EMR_ARGS)
#undef MS_THIS
#define MS_THIS ms_row_sums_args
MS_FIELDS(MS_ROW_SUMS_ARGS)
#undef MS_THIS

#define MS_STRUCT(type, list) {#type, sizeof(type), list##_layout, (int)(sizeof(list##_layout) / sizeof(field_layout))}
static const struct_layout structs[] = {
    MS_STRUCT(ms_weighted_sum_args, MS_WEIGHTED_SUM_ARGS),
    MS_STRUCT(ms_task_vectors_args, MS_TASK_VECTORS_ARGS),
    MS_STRUCT(ms_magnitude_args, MS_MAGNITUDE_ARGS),
    MS_STRUCT(ms_bracket_found, MS_BRACKET_FOUND),
    MS_STRUCT(ms_random_l1_args, MS_RANDOM_L1_ARGS),
    MS_STRUCT(ms_emr_args, MS_EMR_ARGS),
    MS_STRUCT(ms_row_sums_args, MS_ROW_SUMS_ARGS),
};

static const struct_layout *find_struct(const char *type) {
    for (size_t s = 0; s < sizeof(structs) / sizeof(structs[0]); s++)
        if (strcmp(structs[s].name, type) == 0) return &structs[s];
    return NULL;
}

/* sizeof the named struct; 0 when there is none of that name. */
size_t ms_sizeof(const char *type) {
    const struct_layout *s = find_struct(type);
    return s ? s->size : 0;
}

/* The name of field i of the named struct, in declaration order, with its offset and size; NULL past the last. */
const char *ms_field(const char *type, int i, size_t *offset, size_t *size) {
    const struct_layout *s = find_struct(type);
    if (!s || i < 0 || i >= s->count) return NULL;
    *offset = s->fields[i].offset;
    *size = s->fields[i].size;
    return s->fields[i].name;
}
