"""bench's figures as the table it prints."""

from __future__ import annotations


def render_loader_only(result: dict) -> str:
    figure = result["figures"][0]
    return (f"label-images bench --loader-only: {result['images']} images from "
            f"{result['source']}, batch {result['batch_size']}, "
            f"{result['workers']} worker(s)\n"
            f"{figure['name']:<44} {figure['images_per_second']:>9.1f}  {figure['note']}")


def _threads(result: dict) -> str:
    alone, job = result["model_alone_threads"], result["torch_threads"]
    if job in (None, alone):
        return f"{alone} torch thread(s)"
    return f"{alone} torch thread(s), {job} in the job beside its workers"


def render(result: dict) -> str:
    lines = [f"label-images bench: {result['images']} images from {result['source']}; "
             f"{result['model']} {result['precision']} on {result['device']}, batch "
             f"{result['batch_size']}, {result['workers']} worker(s), "
             f"{_threads(result)}",
             f"{'stage':<44} {'images/s':>9}  note"]
    for figure in result["figures"]:
        lines.append(f"{figure['name']:<44} {figure['images_per_second']:>9.1f}  {figure['note']}")
    lines.append(result["fidelity_text"])
    found = result["compile"]
    if "cold_seconds" in found:
        lines.append(f"compile at batch {result['batch_size']}: {found['cold_seconds']:.1f} s "
                     f"cold (empty kernel cache), {found['warm_seconds']:.1f} s warm (kernels "
                     "kept from an earlier run)")
    else:
        expected, why = found["expected"], found.get("not_weighed")
        lines.append("compile: not used by this job" + (
            f" (weighed at {expected['once_seconds']:.0f} s once for "
            f"{expected['images_per_second']:.0f} images/s, from {expected['from']}: "
            f"{found['runtime']} is quicker for the job)" if expected else
            f" (not weighed: {why})" if why else
            f" (--runtime {found['runtime']} asked)") + "; --compile measures it")
    if result.get("auto"):
        choice = result["auto"]
        lines.append(f"auto, from these figures: {choice['for_the_images']} for "
                     f"{choice['images']} images, {choice['for_a_million']} for a million")
    if "planning" in result:
        p = result["planning"]
        lines.append(f"planning {p['rows']:,} rows: {p['plan_seconds']:.1f} s, resume check "
                     f"{p['resume_seconds']:.1f} s, peak {p['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
