"""Jobs: what a `moeconv COMMAND SRC OUT` does, above the passes and formats (this package, the
CLI and the recipe reader are the only parts of `moeconv/` that import `passes`).

Every job goes through one driver (`moeconv.jobs.driver.run_job`): it owns OUT (lock, hidden
sibling directory, rename into place), carries the tokenizer, writes report.json, report.html and
recipe.json. What differs between jobs is the work inside: `pipeline_job.run_to_dir` (load → passes
→ write in the consumer's format → reload and compare), `upcycle.upcycle_checkpoint` (streamed or
in memory), `export_onnx.export_onnx_to_dir` (an ONNX graph with its parity check).
"""
