"""The streamed routes' comparison, with the report's facts about both models gathered in the same
sweep (expert load before and after, sparsity per layer): the models are never whole in memory, so
they are measured while `compare_models` runs them one layer at a time."""
from __future__ import annotations

from moeconv.stream.compare import compare_models
from moeconv.stream.skeleton import Skeleton
from moeconv.summary import LayerFacts


def compare_and_summarise(source: Skeleton, output: Skeleton, *, before: LayerFacts | None = None, **kwargs) -> dict:
    """`compare_models(source, output, **kwargs)` as report fields: `verification`, `input_model`
    and `model` (the facts `moeconv.summary.model_summary` gives for an in-memory model, measured
    on the comparison's held-out tokens). `before`: the source's facts, observed already by the
    run that computed `kwargs["reference"]` (`moeconv.stream.sweep_check`)."""
    before, after = before or LayerFacts(), LayerFacts()
    verification = compare_models(source, output, observe=(before, after), **kwargs)
    return {"verification": verification, "input_model": before.summary(), "model": after.summary()}


def streamed_summary(path, seed: int) -> dict:
    """The report's facts about a written checkpoint, read one decoder layer at a time (expert load
    on random token ids from `seed`, the tokens the in-memory jobs measure it on)."""
    from moeconv.stream.compare import streamed_logits
    from moeconv.verify import check_inputs
    skel = Skeleton.open(path)
    vocab = getattr(skel.config, "vocab_size", None) or skel.module.get_input_embeddings().num_embeddings
    facts = LayerFacts()
    streamed_logits(skel, list(check_inputs(int(vocab), seed + 2, batch=8, seq=32).split(4)), observe=facts)
    return facts.summary()


def upcycle_streamed_fields(report: dict, out_dir, seed: int) -> dict:
    """For `moeconv upcycle`'s streaming route (the model is never whole in memory): its row of the
    pass table and, when the functional check ran (the model is small enough to have been run
    whole), the written model's expert load and sparsity, read back one layer at a time."""
    from moeconv.report import PassReport
    v, up = report.get("verification", {}), report.get("upcycle", {})
    metrics = {"route": "streaming", "model_bytes": report["written"]["bytes"]}
    if "rel_max_diff" in v:
        metrics.update(max_abs_diff=v["max_abs_diff"], rel_max_diff=v["rel_max_diff"])
    summary = (f"{up.get('sites_converted')} of {up.get('sites_found')} FFNs → MoE (streamed); "
               + ("checked against the dense model" if "rel_max_diff" in v else "weights re-read and checksummed"))
    fields = {"passes": [PassReport("upcycle", summary=summary, metrics=metrics).to_dict()]}
    if v.get("mode") == "full":
        fields["model"] = streamed_summary(out_dir, seed)
    return fields
