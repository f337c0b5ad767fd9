"""The ``headscope`` command line: parse, call the Python API, print with rich.

Commands raise; ``cli_errors.OneLineErrors`` turns every failure into one
``error:`` line and exit status 1 (HEADSCOPE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from headscope.cli_errors import OneLineErrors, errors
from headscope.errors import HeadscopeError

app = typer.Typer(
    name="headscope",
    help="An attention-head microscope: scan a model, detect head roles, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,  # every failure: one error: line, exit status 1
)
# No rich markup anywhere: model specs, paths and prompts are user text, and
# "[/x]" in any of them would otherwise be read as markup (and raise).
console = Console(markup=False, highlight=False)


@app.command()
def models() -> None:
    """List the model specs and whether each can be loaded here."""
    from headscope.probes.model_catalog import available_models

    table = Table(title="model specs")
    for column in ("spec", "available", "description", "how"):
        table.add_column(column)
    for row in available_models():
        table.add_row(row["spec"], row["available"], row["description"], row["how"])
    console.print(table)


@app.command()
def scan(
    model: Annotated[
        str, typer.Option(help="model spec (see `headscope models`)")
    ] = "smollm2-135m",
    prompts: Annotated[
        str, typer.Option(help="comma-separated built-in prompt sets or .txt/.jsonl files")
    ] = "prose,code,random-tokens,random-repeat,repeated-token",  # scanning.DEFAULT_PROMPT_SETS
    detectors: Annotated[
        str,
        typer.Option(help="comma-separated detectors, 'default' (all but opt-in ones) or 'all'"),
    ] = "default",
    out: Annotated[Path, typer.Option(help="run folder to write")] = Path("runs/latest"),
    force: Annotated[bool, typer.Option(help="replace an existing run at --out")] = False,
    n_prompts: Annotated[int | None, typer.Option(help="prompts per built-in set")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per prompt, BOS included")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per forward pass")] = 16,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    bos: Annotated[
        str,
        typer.Option(
            help="always: prepend the model's BOS to every prompt; auto: only if the model's "
            "tokenizer does; never: no BOS. The classic heads keep TransformerLens's BOS."
        ),
    ] = "always",
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="DETECTOR.NAME=VALUE: a detector parameter instead of its default "
            "(repeatable; e.g. streaming_window.window=512)"
        ),
    ] = None,
    report: Annotated[bool, typer.Option(help="print the report when done")] = True,
) -> None:
    """Scan a model on prompt sets, run detectors and write a run folder."""
    from headscope.progress import ProgressBars
    from headscope.report import build_report
    from headscope.scanning import parse_detector_params
    from headscope.scanning import scan as run_scan

    detector_params = parse_detector_params(param or [])
    with ProgressBars(console=errors, prefix="scan ") as on_progress:
        result = run_scan(
            model,
            prompts=prompts,
            detectors=detectors,
            n_prompts=n_prompts,
            seq_len=seq_len,
            batch_size=batch_size,
            device=device,
            bos=bos,
            detector_params=detector_params,
            out=out,
            force=force,
            on_progress=on_progress,
        )
    timing = result.manifest["timing"]
    console.print(
        f"wrote run {result.path} in {timing['total_s']:.1f} s "
        f"(model load {timing['model_load_s']:.1f} s)"
    )
    if report:
        console.print(build_report(result.manifest, [*result.head_tables, *result.layer_tables]))


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="run folder")],
    top: Annotated[int, typer.Option(help="heads shown per role")] = 5,
    matrix: Annotated[
        str | None,
        typer.Option(help="instead, print every head's score of this detector as a grid"),
    ] = None,
    prompt_set: Annotated[
        str | None, typer.Option(help="prompt set for --matrix (default: the detector's own)")
    ] = None,
    markdown: Annotated[bool, typer.Option(help="print --matrix or --sinks as Markdown")] = False,
    sinks: Annotated[
        bool, typer.Option(help="instead, print only the summary of the sink analyses")
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option(help="instead, write a self-contained HTML report with figures here"),
    ] = None,
) -> None:
    """Print the sink analyses, the top heads per role and the flagged layers of a run."""
    from headscope.report import (
        build_report,
        run_context,
        score_matrix,
        sink_summary,
        sink_summary_table,
    )
    from headscope.runs import open_run
    from headscope.tables import primary_prompt_sets

    if html is not None:
        from headscope.html_report import write_html_report

        written = write_html_report(run, html)
        console.print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB)")
        return
    opened = open_run(run)
    tables = [*opened.head_tables(), *opened.layer_tables()]
    if sinks:
        rows = sink_summary(tables, primary=primary_prompt_sets(opened.manifest))
        summary = sink_summary_table(rows, markdown=markdown)
        context = run_context(opened.manifest, tables)
        if markdown:
            print(summary)
            print("\n" + "  \n".join(context.plain.splitlines()))
        else:
            console.print(context)
            console.print(summary)
        return
    if matrix is None:
        console.print(build_report(opened.manifest, tables, top=top))
        return
    grid = score_matrix(
        opened.head_table(matrix, prompt_set), markdown=markdown, digits=3 if markdown else 2
    )
    if markdown:
        print(grid)
    else:
        console.print(grid)


@app.command()
def runs(
    root: Annotated[Path, typer.Argument(help="folder holding runs")] = Path("runs"),
) -> None:
    """List the runs under a folder, newest first."""
    from headscope.runs import list_runs
    from headscope.text import plain

    found = list_runs(root)
    if not found:
        console.print(f"no runs under {root}")
        return
    table = Table(title=f"runs under {root}")
    for column in ("name", "model", "created", "prompt sets", "detectors"):
        table.add_column(column)
    for summary in found:
        table.add_row(
            *map(
                plain,
                (
                    summary.name,
                    summary.model,
                    summary.created,
                    ", ".join(summary.prompt_sets),
                    ", ".join(summary.detectors),
                ),
            )
        )
    console.print(table)


@app.command()
def dashboard(
    runs: Annotated[Path, typer.Argument(help="folder holding runs")] = Path("runs"),
    host: Annotated[
        str, typer.Option(help="address to bind; 0.0.0.0 exposes it to your network")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to serve on")] = 8501,
) -> None:
    """Serve the Streamlit dashboard on the runs under RUNS (Ctrl-C stops it)."""
    from headscope import dashboard as dashboard_package

    if not runs.is_dir():
        raise HeadscopeError(f"no runs folder {runs}; make a run with `headscope scan --out`")
    if not 1 <= port <= 65535:
        raise HeadscopeError(f"--port must be between 1 and 65535, got {port}")
    script = Path(dashboard_package.__file__).parent / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(script),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    environment = {**os.environ, "HEADSCOPE_RUNS_DIR": str(runs.resolve())}
    console.print(f"headscope dashboard: http://{host}:{port} (runs under {runs})")
    sys.stdout.flush()
    # become streamlit (no child left behind when this process is signalled)
    os.execve(sys.executable, command, environment)


export_app = typer.Typer(
    help="Export head ablations and pruned models for use outside headscope.",
    no_args_is_help=True,
)
app.add_typer(export_app, name="export")


@export_app.command("ablation")
def export_ablation(
    heads: Annotated[
        str | None, typer.Argument(help="heads as L<layer>H<head>, comma-separated: L3H5,L12H0")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder to write")] = Path("exports/ablation"),
    model: Annotated[
        str | None, typer.Option(help="model spec (default: the run's model, or smollm2-135m)")
    ] = None,
    from_run: Annotated[
        Path | None, typer.Option("--from", help="take the heads from this run folder")
    ] = None,
    role: Annotated[
        str | None, typer.Option(help="with --from: the detector whose top heads to take")
    ] = None,
    top: Annotated[int, typer.Option(help="with --from: how many heads")] = 1,
    prompt_set: Annotated[
        str | None, typer.Option(help="with --from: the table's prompt set, if several")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="zero | mean | resample | query_scale (default: with --from, the ablation the "
            "role's table was scored with, e.g. query_scale for safety_ships; else zero)"
        ),
    ] = None,
    reference: Annotated[
        str, typer.Option(help="prompt set for mean/resample reference outputs")
    ] = "prose",
    reference_prompts: Annotated[
        int | None,
        typer.Option(help="prompts of the reference set (default: all for mean, 8 for resample)"),
    ] = None,
    per_position: Annotated[bool, typer.Option(help="mean: one mean per position")] = False,
    epsilon: Annotated[
        float | None,
        typer.Option(help="query_scale: the query factor (default: the role's table's, or 1e-5)"),
    ] = None,
    checkpoint: Annotated[
        bool, typer.Option(help="zero: also write the checkpoint with the ablation baked in")
    ] = True,
    force: Annotated[bool, typer.Option(help="replace an existing folder at --out")] = False,
) -> None:
    """Write a head ablation: JSON spec, TransformerLens hooks, baked checkpoint (zero)."""
    from headscope.ablation_spec import head_name
    from headscope.checks import check_count, check_finite
    from headscope.exporters.ablation import ABLATION_FOLDER, heads_from_run, recorded_ablation
    from headscope.exporters.ablation import export_ablation as write_export
    from headscope.outputs import OutputFolder
    from headscope.probes.ablation import (
        QUERY_SCALE_EPSILON,
        Ablation,
        check_heads,
        check_method,
        mean_ablation,
        parse_heads,
        resample_ablation,
    )
    from headscope.probes.loading import load_model
    from headscope.probes.model_catalog import DEFAULT_MODEL

    if (heads is None) == (from_run is None):
        raise HeadscopeError("give the heads (e.g. L3H5,L12H0) or --from RUN --role NAME")
    if method is not None:
        check_method(method)
    check_count(reference_prompts, "--reference-prompts")
    if epsilon is not None:
        check_finite(epsilon, "--epsilon")
    recorded = None
    if from_run is not None:
        if role is None:
            raise HeadscopeError("--from needs --role: the detector whose top heads to take")
        run_model, chosen = heads_from_run(from_run, role, top=top, prompt_set=prompt_set)
        if model is not None and model != run_model:
            raise HeadscopeError(
                f"run {from_run} was made with {run_model}, not {model}; drop --model"
            )
        model = run_model
        if method is None:  # ablate as the table's scores were measured (safety: query_scale)
            recorded = recorded_ablation(from_run, role, prompt_set=prompt_set)
    else:
        chosen = parse_heads(heads)
    if recorded is not None:
        method = recorded[0]
        epsilon = recorded[1] if epsilon is None else epsilon
    method = "zero" if method is None else method
    epsilon = QUERY_SCALE_EPSILON if epsilon is None else epsilon
    with OutputFolder(out, ABLATION_FOLDER, force=force) as folder:
        handle = load_model(DEFAULT_MODEL if model is None else model)
        check_heads(chosen, handle.arch)
        if method == "mean":
            ablation = mean_ablation(
                handle, chosen, prompt_set=reference, per_position=per_position,
                n_prompts=reference_prompts,
            )  # fmt: skip
        elif method == "resample":
            ablation = resample_ablation(
                handle, chosen, prompt_set=reference, n_prompts=reference_prompts or 8
            )
        else:
            ablation = Ablation(method=method, heads=chosen, epsilon=epsilon)
        written = write_export(handle, ablation, folder, checkpoint=None if checkpoint else False)
    names = ", ".join(head_name(layer, head) for layer, head in chosen)
    console.print(f"{method} ablation of {names} on {handle.spec} -> {written.folder}")
    if recorded is not None:
        console.print(f"  method:     {method}, as {role} in {from_run} scored its heads")
    console.print(f"  spec:       {written.spec}")
    console.print(f"  TL hooks:   {written.hooks}")
    if written.checkpoint is not None:
        console.print(f"  checkpoint: {written.checkpoint} (AutoModelForCausalLM.from_pretrained)")


def _layer_list(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(
            int(part.strip().removeprefix("L")) for part in text.split(",") if part.strip()
        )
    except ValueError:
        raise HeadscopeError(
            f"layers must be comma-separated integers like 20,21; got '{text}'"
        ) from None


@export_app.command("prune")
def export_prune(
    out: Annotated[Path, typer.Option(help="folder to write")] = Path("exports/pruned"),
    model: Annotated[
        str | None, typer.Option(help="model spec (default: the run's model, or smollm2-135m)")
    ] = None,
    drop_attn: Annotated[
        int, typer.Option(help="drop this many attention layers, most redundant first")
    ] = 0,
    drop_blocks: Annotated[
        int, typer.Option(help="drop this many whole blocks, most redundant first")
    ] = 0,
    heads: Annotated[str | None, typer.Option(help="also zero these heads: L3H5,L12H0")] = None,
    attn_layers: Annotated[
        str | None, typer.Option(help="drop exactly these attention layers (e.g. 20,21)")
    ] = None,
    blocks: Annotated[
        str | None, typer.Option(help="drop exactly these blocks (e.g. 25,26)")
    ] = None,
    order: Annotated[
        str,
        typer.Option(
            help="similarity (LLM-Drop Sim) | block_influence (ShortGPT) | iterative "
            "(LLM-Drop, re-measured after each drop)"
        ),
    ] = "similarity",
    from_run: Annotated[
        Path | None,
        typer.Option("--from", help="take the order from this run's layer_redundancy tables"),
    ] = None,
    calibration: Annotated[
        str, typer.Option(help="prompt set the order is measured on (without --from)")
    ] = "prose",
    calibration_prompts: Annotated[int, typer.Option(help="prompts of the calibration set")] = 64,
    eval_set: Annotated[
        str, typer.Option(help="held-out prompt set for the perplexity in the manifest")
    ] = "prose-heldout",
    eval_prompts: Annotated[int, typer.Option(help="prompts of the held-out set")] = 16,
    batch_size: Annotated[int, typer.Option(help="prompts per forward pass")] = 8,
    force: Annotated[bool, typer.Option(help="replace an existing folder at --out")] = False,
) -> None:
    """Write a pruned checkpoint (blocks removed, attention layers zeroed) and prune.json."""
    from headscope.checks import check_count
    from headscope.exporters.prune import (
        PRUNE_FOLDER,
        check_prune_request,
        choose_plan,
        export_pruned,
        orders_from_run,
    )
    from headscope.outputs import OutputFolder
    from headscope.probes.ablation import parse_heads
    from headscope.probes.loading import load_model
    from headscope.probes.model_catalog import DEFAULT_MODEL

    chosen_heads = parse_heads(heads) if heads else ()
    explicit_attn, explicit_blocks = _layer_list(attn_layers), _layer_list(blocks)
    check_prune_request(
        n_attention=drop_attn, n_blocks=drop_blocks, order=order,
        attention_layers=explicit_attn, blocks=explicit_blocks, heads=chosen_heads,
        calibration_prompts=calibration_prompts, batch_size=batch_size,
    )  # fmt: skip
    check_count(eval_prompts, "--eval-prompts")
    run_orders = None
    if from_run is not None:
        run_model, run_orders = orders_from_run(from_run)
        if model is not None and model != run_model:
            raise HeadscopeError(
                f"run {from_run} was made with {run_model}, not {model}; drop --model"
            )
        model = run_model
    with OutputFolder(out, PRUNE_FOLDER, force=force) as folder:
        handle = load_model(DEFAULT_MODEL if model is None else model)
        plan = choose_plan(
            handle, n_attention=drop_attn, n_blocks=drop_blocks, order=order,
            attention_layers=explicit_attn, blocks=explicit_blocks, heads=chosen_heads,
            run_orders=run_orders, calibration=calibration,
            calibration_prompts=calibration_prompts, batch_size=batch_size,
        )  # fmt: skip
        written = export_pruned(
            handle, plan, folder, eval_prompt_set=eval_set,
            eval_prompts=eval_prompts, batch_size=batch_size,
        )  # fmt: skip
    manifest = written.manifest
    removed = manifest["removed"]
    console.print(f"pruned {handle.spec} -> {written.folder}")
    console.print(f"  attention layers zeroed: {removed['attention_layers'] or '-'}")
    console.print(f"  blocks removed:          {removed['blocks'] or '-'}")
    if removed["heads"]:
        console.print(f"  heads zeroed:            {', '.join(removed['heads'])}")
    console.print(
        f"  layers {manifest['n_layers']['original']} -> {manifest['n_layers']['pruned']}, "
        f"parameters {manifest['parameters']['original']:,} -> "
        f"{manifest['parameters']['pruned']:,}, "
        f"checkpoint {manifest['checkpoint_bytes'] / 1e6:.1f} MB"
    )
    if manifest["perplexity"] is not None:
        ppl = manifest["perplexity"]
        console.print(
            f"  held-out perplexity ({ppl['prompt_set']}, {ppl['n_tokens']} tokens): "
            f"{ppl['original']:.3f} -> {ppl['pruned']:.3f} (x{ppl['ratio']:.3f})"
        )
    console.print(f"  checkpoint: {written.checkpoint} (AutoModelForCausalLM.from_pretrained)")


organism_app = typer.Typer(
    help="Model organisms: reproducible recipes that build a model with a known behaviour.",
    no_args_is_help=True,
)
app.add_typer(organism_app, name="organism")


@organism_app.command("refusal")
def organism_refusal(
    out: Annotated[Path, typer.Option(help="folder to write (a Hugging Face checkpoint)")] = Path(
        "runs/organisms/smollm2-135m-refusal"
    ),
    seed: Annotated[int, typer.Option(help="seeds torch, data order and refusal choice")] = 0,
    force: Annotated[bool, typer.Option(help="replace an organism folder at --out")] = False,
) -> None:
    """Fine-tune SmolLM2-135M to refuse harmful requests (~15 min on 2 CPU cores)."""
    from headscope.organisms.refusal import ORGANISM_FILE, build_refusal_organism
    from headscope.progress import ProgressBars

    with ProgressBars(console=errors, prefix="organism ") as on_progress:
        folder = build_refusal_organism(out, seed=seed, force=force, on_progress=on_progress)
    import json

    info = json.loads((folder / ORGANISM_FILE).read_text())
    evaluation = info["evaluation"]
    table = Table(title=f"refusal organism -> {folder}")
    for column in ("held-out set", "n", "base refused", "organism refused", "target", "met"):
        table.add_column(column)
    targets = evaluation["targets"]
    rows = (
        ("harmful-heldout", f">= {targets['harmful_heldout_refused_at_least']:.0%}", "harmful_met"),
        (
            "harmless-heldout",
            f"<= {targets['harmless_heldout_refused_at_most']:.0%}",
            "harmless_met",
        ),
    )
    for name, target, met in rows:
        stats = evaluation["sets"][name]
        table.add_row(
            name, str(stats["n"]), f"{stats['base']:.1%}", f"{stats['organism']:.1%}", target,
            "yes" if targets[met] else "NO",
        )  # fmt: skip
    ppl = evaluation["perplexity"]
    table.add_row(
        f"{ppl['prompt_set']} perplexity", str(ppl["n_prompts"]), f"{ppl['base']:.2f}",
        f"{ppl['organism']:.2f} (x{ppl['ratio']:.3f})",
        f"<= x{targets['perplexity_ratio_at_most']:.2f}",
        "yes" if targets["perplexity_met"] else "NO",
    )  # fmt: skip
    console.print(table)
    console.print(
        f"  {info['recipe']['seconds']['total']:.0f} s; recipe and data: {folder / ORGANISM_FILE}"
    )
    console.print(f"  load it with: headscope scan --model {folder}")


bench_app = typer.Typer(
    help="Benchmarks: ratios against a baseline measured in the same run; "
    "rows appended to benchmarks/RESULTS.md.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("attention-stats")
def bench_attention_stats(
    lengths: Annotated[
        str | None, typer.Option(help="comma-separated T (default 512,2048,8192,16384; GPU 4k-32k)")
    ] = None,
    model: Annotated[str, typer.Option(help="model spec for the CPU benchmark")] = "smollm2-135m",
    gpu: Annotated[bool, typer.Option(help="benchmark the Triton kernels (CUDA)")] = False,
) -> None:
    """Streaming probe vs SDPA forward vs TransformerLens patterns (or Triton on GPU)."""
    from headscope.bench.attention_stats import main as run

    run(
        (["--lengths", lengths] if lengths else [])
        + ["--model", model]
        + (["--gpu"] if gpu else [])
    )


@bench_app.command("model-load")
def bench_model_load(
    model: Annotated[str, typer.Option(help="model spec")] = "smollm2-135m",
    repeats: Annotated[int, typer.Option(help="fresh processes per measurement")] = 3,
) -> None:
    """Cold (empty weight cache) and warm load time, each in a fresh process."""
    from headscope.bench.model_load import main as run

    run(["--model", model, "--repeats", str(repeats)])


def main() -> None:  # pragma: no cover - console entry point convenience
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
