"""Dataset augmentation: expand images x prompts x seeds into a manifest, then tabulate outputs.

`expand_manifest` streams a source manifest (CSV or Parquet, local or S3; it needs `image` or
`images`, `id` is optional) and writes a Parquet manifest with one row per (source row,
prompt, seed), in that order:

- `id`: `<source_id>--p<prompt_index>--s<seed>` (a long source id is shortened, see
  pipeline.uses.catalogue.shorten_id, so the id stays within the manifest's 256 characters);
- `source_id` (the source row's id, or `row-<n>`), `source_row` (its 1-based row number),
  `prompt_index` (0-based in `prompts`; always 0 for a template);
- `image` / `images` / `mask` as in the source, relative paths made absolute (against the
  source manifest's location) so the expanded manifest works wherever it is written;
  `images` is written as a JSON array;
- `prompt`: the spec's prompt, or the template filled from the source row;
- `seed`: the spec's seed; `n`: the spec's `n` (else the source's, if it has the column);
- the source's other edit columns (`size`, `output_format`, `param.*`, ...) carried over, and
  the spec's `settings`, which win over them. The source's `prompt` and `seed` are replaced
  (a template can still use them: `{prompt}`); its other columns are only for the template.

A template is a Python format string whose fields are column names: `"{caption}, in the
style of {style}"`, `"{caption!r:.40}"`. A field names a column whole (`{param.turbo}` is that
column; there is no attribute or index access). A template naming a column the manifest lacks
is an error before anything is written; an empty cell it needs is an error naming the row.
A filled prompt longer than the API allows makes that row invalid when it runs, as usual.

`write_dataset_table` turns the run's results table (plus the expanded manifest, for the
source ids) into the augmented dataset: a Parquet file with one row per OUTPUT image (a job
with n variants gives n rows), loadable with `pandas.read_parquet` or `datasets`'s Parquet
loader. Its columns (DATASET_SCHEMA):

- `row` (int64), `id`: the manifest row and its id;
- `source_id`, `prompt_index` (int64, null without an expanded manifest): which source and
  which prompt of the spec;
- `source_uri`: the edited source image; `source_uris` (list<string>): it and any references;
- `prompt`, `seed` (int64);
- `variant` (int32): 0-based index of the output within its job (0..n-1);
- `output_uri`: the result image (absolute local path or s3:// URI);
- `width`, `height` (int32), `format` (png, jpeg, webp...): of the result image;
- `revised_prompt`: the provider's rewrite of the prompt, when it made one;
- `cost` (float64, USD): what THIS run paid for the image (the job's cost / its outputs);
  0.0 for an image an earlier run made, or another row of this run made;
- `job_key`, `sidecar_uri`: the job and its JSON sidecar (full request and response);
- `status`: `succeeded` (edited in this run), `done` (an earlier run's result, read from its
  sidecar), `duplicate` (the same job as another row of this run).

Rows that failed, were invalid, or were skipped without a result are left out (DatasetInfo
counts them). The width, height and format of a `succeeded` or `duplicate` row come from the
results table (every output of one request has the same size); a `done` row's come from its
sidecar, one read per job.

The package: `spec` (AugmentSpec and the prompt template), `expand` (`expand_manifest`),
`dataset` (`write_dataset_table`).
"""

from __future__ import annotations

from pipeline.uses.augment.dataset import DATASET_SCHEMA, DatasetInfo, write_dataset_table
from pipeline.uses.augment.expand import ExpandInfo, expand_manifest, expanded_id
from pipeline.uses.augment.spec import AugmentSpec, fill_template, template_fields

__all__ = [
    "DATASET_SCHEMA",
    "AugmentSpec",
    "DatasetInfo",
    "ExpandInfo",
    "expand_manifest",
    "expanded_id",
    "fill_template",
    "template_fields",
    "write_dataset_table",
]
