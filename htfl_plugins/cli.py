"""``htfl`` command line: run | list | data show | compare (+ plugin commands)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from htfl_plugins import __version__
from htfl_plugins import config as config_mod
from htfl_plugins.config import RunConfig
from htfl_plugins.errors import HtflError, PluginError
from htfl_plugins.plugins import get_plugins

log = logging.getLogger("htfl")


class Parser(argparse.ArgumentParser):
    """Argument errors as one line and exit code 2."""

    def error(self, message):
        raise HtflError(f"{self.prog}: {message}")


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


# ------------------------------------------------------------------ run
def _common_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="settings from a TOML file; flags override it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument("-v", "--verbose", action="store_true", help="log every round")


def run_config_from_args(argv: list[str], prog: str = "htfl run"):
    """Parse ``htfl run`` arguments into a RunConfig (defaults < TOML < flags)."""
    plugins = get_plugins()
    pre = Parser(prog=prog, add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--algo")
    known, _ = pre.parse_known_args(argv)
    file_values = {}
    if known.config:
        file_values = {k.replace("-", "_"): v for k, v in config_mod.load_toml(known.config).items()}
    algo_name = known.algo or file_values.get("algo") or RunConfig.algo
    algo = plugins.algorithm(algo_name)

    parser = Parser(prog=prog, description=f"Run {algo_name}: {algo.summary}",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common_run_flags(parser)
    config_mod.add_arguments(parser.add_argument_group("run settings"), RunConfig, skip={"options"})
    group = parser.add_argument_group(f"{algo_name} options")
    try:
        config_mod.add_arguments(group, algo.options)
    except argparse.ArgumentError as exc:
        raise PluginError(f"plugin {algo.plugin!r}: an option of {algo_name!r} clashes with a run flag: "
                          f"{exc}") from None
    args = vars(parser.parse_args(argv))
    meta = {k: args.pop(k) for k in ("config", "quiet", "verbose")}
    option_names = {f.name for f in config_mod.fields_of(algo.options)}
    options = {k.replace("-", "_"): v for k, v in (file_values.pop("options", {}) or {}).items()}
    options.update({k: v for k, v in args.items() if k in option_names})
    values = {**file_values, **{k: v for k, v in args.items() if k not in option_names}}
    values["options"] = options
    values["algo"] = algo_name
    cfg = config_mod.build(RunConfig, values, "setting(s)" + (f" in {known.config}" if known.config else ""))
    return cfg, meta


def cmd_run(argv: list[str]) -> int:
    from htfl_plugins.engine import run

    cfg, meta = run_config_from_args(argv)
    _setup_logging(meta["quiet"], meta["verbose"])
    path = run(cfg, quiet=meta["quiet"])
    print(path)
    return 0


def cmd_resume(args) -> int:
    from htfl_plugins.engine import run
    from htfl_plugins.results import read_run

    path = Path(args.run)
    saved = config_mod.with_legacy(read_run(path)["config"])
    saved.update(name=path.stem, out=str(path.parent))
    cfg = config_mod.build(RunConfig, saved, f"setting(s) stored in {path}")
    _setup_logging(args.quiet, False)
    print(run(cfg, quiet=args.quiet, resume=True))
    return 0


# ------------------------------------------------------------------ list
def cmd_list(args) -> int:
    plugins = get_plugins()
    reg = plugins.registry(args.kind)
    names = reg.names()
    width = max((len(n) for n in names), default=0)
    for name in names:
        item = reg.get(name)
        print(f"{name:<{width}}  {item.summary}  [{item.plugin}]")
    return 0


# ------------------------------------------------------------------ data
def cmd_data(argv: list[str]) -> int:
    from htfl_plugins.data import load_scenario

    parser = Parser(prog="htfl data show", description="Build (or load) a scenario and print "
                    "each client's label histogram.")
    config_mod.add_arguments(parser, RunConfig, skip={"options", "algo"})
    args = vars(parser.parse_args(argv))
    cfg = config_mod.build(RunConfig, args, "setting(s)")
    _setup_logging(False, False)
    plugins = get_plugins()
    if not cfg.dataset.startswith("pfl:"):
        plugins.registry("partitioners").get(cfg.partition)
    scenario = load_scenario(cfg, plugins)
    hist = scenario.histogram()
    print(f"{scenario.dataset}: {len(scenario.clients)} clients, {scenario.num_classes} classes, "
          f"input {'×'.join(map(str, scenario.input_shape))}; cached at {scenario.path}")
    k = scenario.num_classes
    head = "client  train  test  " + " ".join(f"{c:>5}" for c in range(k))
    print(head)
    for i, (c, row) in enumerate(zip(scenario.clients, hist)):
        print(f"{i:>6}  {c.n_train:>5}  {c.n_test:>4}  " + " ".join(f"{v:>5}" for v in row))
    return 0


# ------------------------------------------------------------------ compare
def cmd_compare(args) -> int:
    from htfl_plugins.results import load
    from htfl_plugins.results.plots import plot_acc_vs_upload, plot_curves
    from htfl_plugins.results.tables import (
        DIVERGED_NOTE,
        compare_table,
        pivot_table,
        render,
        round_column,
        rounds_table,
        std_note,
        time_table,
        traffic_table,
    )

    if args.rounds is not None and args.rounds < 0:
        raise HtflError(f"--rounds must be at least 0, got {args.rounds}")
    ddof = {"sample": 1, "population": 0}[args.std]
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        df = load(args.paths, until=args.rounds, unfinished=args.unfinished)
    for note in notes:
        print(note.message, file=sys.stderr)
    if args.table == "pivot":
        table, index = pivot_table(df, metric=args.metric or "best_acc", ddof=ddof), True
    elif args.table == "traffic":
        table, index = traffic_table(df), True
    elif args.table == "time":
        table, index = time_table(df), True
    elif args.table == "rounds":
        try:
            at = [int(r) for r in args.at.split(",")]
        except ValueError:
            raise HtflError(f"--at wants comma-separated round numbers, got {args.at!r}") from None
        table, index = rounds_table(df, at, metric=round_column(args.metric or "test_acc"), ddof=ddof), True
    else:
        table, index = compare_table(df, by=args.by.split(",") if args.by else None, ddof=ddof,
                                     metric=args.metric), False
    text = render(table, args.format, index=index, ddof=ddof)
    if "†" in text:
        if args.format == "markdown":
            text += "\n\n" + DIVERGED_NOTE
        else:
            print(DIVERGED_NOTE, file=sys.stderr)
    if args.format == "csv":
        print(std_note(ddof), file=sys.stderr)
    print(text)
    if args.output:
        _write_output(Path(args.output), text + ("" if text.endswith("\n") else "\n"))
    if args.plot:
        print(f"curves written to {plot_curves(df, args.plot, metric=args.metric or 'test_acc', ddof=ddof)}")
    if args.plot_upload:
        print(f"accuracy against upload written to {plot_acc_vs_upload(df, args.plot_upload, ddof=ddof)}")
    return 0


def _write_output(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise HtflError(f"cannot write the table to {path}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------ bench
def cmd_bench(args) -> int:
    from htfl_plugins.bench import cell_status, estimated_steps, load_suite, run_suite

    plugins = get_plugins()
    name, cells = load_suite(args.suite, args.out, plugins)
    if args.only:
        import fnmatch

        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in args.only)]
        if not cells:
            raise HtflError(f"no cell of {args.suite} matches --only {' '.join(args.only)} "
                            "(`htfl bench SUITE --dry-run` lists the cell names)")
    if args.dry_run:
        total = 0
        for c in cells:
            cfg = c.config
            steps = estimated_steps(cfg, plugins)
            total += steps or 0
            cost = f"~{steps / 1e3:,.0f}k local steps" if steps else "cost unknown"
            print(f"{c.name:<60} {cell_status(c):<10} {cfg.algo} {cfg.dataset} {cfg.models} "
                  f"{cfg.clients} clients, {cfg.rounds} rounds, {cost}")
        print(f"{len(cells)} cells, ~{total / 1e6:,.1f}M local SGD steps of batch size "
              f"{cells[0].config.batch_size} (at most: early stops cut it); results in {cells[0].config.out}")
        return 0
    run_suite(cells, jobs=args.jobs)
    print(cells[0].config.out)
    return 0


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="htfl", description="Heterogeneous federated learning with plugin algorithms.")
    parser.add_argument("--version", action="version", version=f"htfl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.add_parser("run", help="run one experiment (htfl run --algo NAME --help for its options)",
                   add_help=False)
    p = sub.add_parser("resume", help="continue an interrupted run from its checkpoint")
    p.add_argument("run", help="the run's .h5 file (its .ckpt lies beside it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("list", help="list registered plugins' items")
    p.add_argument("kind", choices=get_plugins().kinds())
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("data", help="inspect scenarios")
    p.add_argument("action", choices=["show"])
    p = sub.add_parser("compare", help="table (and curves) from result files")
    p.add_argument("paths", nargs="+", help="result files or folders")
    p.add_argument("--table", choices=["summary", "pivot", "rounds", "traffic", "time"], default="summary",
                   help="summary: one row per method and scenario; pivot: methods × scenarios, best "
                   "per column in bold (the paper's layout); rounds: test accuracy after the rounds of "
                   "--at; traffic: elements up/down per round in millions; time: seconds per round")
    p.add_argument("--at", default="1,2,5,10,20,50", help="rounds table: comma-separated rounds")
    p.add_argument("--rounds", type=int, help="read only rounds 0..N of every run, as if longer runs "
                   "had stopped there (best and last accuracy within a budget of N rounds)")
    p.add_argument("--metric", help="what the tables and --plot show: best_acc (the pivot's default), "
                   "last_acc, best_auc, or a per-round column of the results (acc_head, local_loss, "
                   "server_align_mmd, ...; tables show its last value per run, the rounds table and "
                   "--plot every round's)")
    p.add_argument("--std", choices=["sample", "population"], default="sample",
                   help="the ± over seeds: sample standard deviation (ddof 1) or population (ddof 0, "
                   "PFLlib's np.std)")
    p.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    p.add_argument("--output", "-o", help="also write the table to this file")
    p.add_argument("--plot", help="draw accuracy curves (mean ± std over seeds) to this image file")
    p.add_argument("--plot-upload", help="draw best accuracy against upload per round to this image file")
    p.add_argument("--by", help="summary table: comma-separated columns to group by "
                   "(default method,dataset,partition,clients,models and any other scenario setting "
                   "on which the runs differ; method is the tag, else the algorithm)")
    p.add_argument("--unfinished", action="store_true", help="also read runs that have not finished "
                   "(running, interrupted, failed), as far as they got; by default they are left out "
                   "(a diverged run is always read, its cells marked †)")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("bench", help="run a benchmark suite (TOML grid), skipping finished cells")
    p.add_argument("suite", help="suite file, e.g. benchmarks/suites/fedktl-ablations.toml")
    p.add_argument("--out", default="results", help="parent folder of the suite's result folder")
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status")
    p.add_argument("--only", nargs="+", metavar="GLOB",
                   help="only the cells whose names match one of these patterns, e.g. '*digits*'")
    p.set_defaults(func=cmd_bench)
    get_plugins().hook.register_commands(subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "run":
            return cmd_run(argv[1:])
        if argv[:2] == ["data", "show"]:
            return cmd_data(argv[2:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        _setup_logging(False, False)
        return int(args.func(args) or 0)
    except HtflError as exc:
        print(f"htfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("htfl: interrupted; the rounds finished so far are in the result file", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
