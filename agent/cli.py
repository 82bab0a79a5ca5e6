"""The `parley` command line.

Each sub-command parses its own arguments here and hands off to the module that owns
the work, imported lazily so that `parley models` does not load torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.config import Settings, load_settings
from agent.errors import ParleyError


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from agent.front.server import serve

    serve(settings)
    return 0


def _cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from agent.assets import MODELS, prepare, status
    from agent.progress import byte_bar

    rows = []
    failed = False
    for spec in MODELS.values():
        if args.prepare and not (spec.optional and not status(spec, settings.cache_dir).installed):
            try:
                prepare(spec, settings.cache_dir, byte_bar)
            except ParleyError as exc:
                print(f"error: {exc.message}", file=sys.stderr)
                failed = True
        st = status(spec, settings.cache_dir, verify=args.verify)
        state = "installed" if st.installed else ("not installed (optional)" if spec.optional
                                                  else "NOT INSTALLED")
        rows.append((spec.name, spec.role, " + ".join(spec.packages) if len(spec.packages) < 3
                     else f"{spec.packages[0]} … ({len(spec.packages)} packages)",
                     f"{st.size / 1e6:.0f} MB", state, _runs_as(spec, st.path, settings),
                     st.checksum, str(st.path or "-")))
        if not st.installed and not spec.optional:
            failed = True
            print(f"error: {spec.name}: install with `{spec.install_hint()}`", file=sys.stderr)
    header = ("model", "role", "source package", "size", "status", "weights", "checksum",
              "path")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"cache folder: {settings.cache_dir}")
    return 1 if failed else 0


def _runs_as(spec, path: Path | None, settings: Settings) -> str:
    """An installed LLM's weights format under the current `llm_weights` setting."""
    if spec.role != "llm" or path is None or not path.is_file():
        return "-"
    from agent.decoder.gguf_loader import read_header
    from agent.decoder.quantize import planned_format

    try:
        _, infos = read_header(path)
        return planned_format(settings.llm_weights, {i.name: i.qtype.name for i in infos})
    except ParleyError as exc:
        return f"unreadable: {exc.message}"


def _cmd_transcribe(settings: Settings, args: argparse.Namespace) -> int:
    from agent.speech.commands import transcribe_command

    return transcribe_command(settings, args)


def _cmd_say(settings: Settings, args: argparse.Namespace) -> int:
    from agent.speech.commands import say_command

    return say_command(settings, args)


def _cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    from agent.decoder.commands import generate_command

    return generate_command(settings, args)


def _cmd_key_hash(settings: Settings, args: argparse.Namespace) -> int:
    """The `hash` value of a [keys.<name>] table for this key."""
    from agent.api_keys import HASHED, key_digest

    key = args.key if args.key != "-" else sys.stdin.readline().strip()
    print(HASHED + key_digest(key))
    return 0


def _cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.what == "speech":
        from agent.bench.speech import bench_speech

        return bench_speech(settings, args)
    if args.what == "chat":
        from agent.bench.chat import bench_chat

        return bench_chat(settings, args)
    if args.what == "tools":
        from agent.bench.tools import bench_tools

        return bench_tools(settings, args)
    if args.what == "kernels":
        from agent.bench.kernels import run

        return run()
    if args.what == "gpu":
        from agent.bench.gpu import run as run_gpu

        return run_gpu(quick=args.quick)
    if args.what == "quality":
        from agent.bench.quality import bench_quality

        return bench_quality(settings, args)
    if args.what == "realtime":
        from agent.bench.realtime import bench_realtime

        return bench_realtime(settings, args)
    if args.what == "phone":
        from agent.bench.phone import bench_phone

        return bench_phone(settings, args)
    if args.what == "load":
        from agent.bench.load import bench_load

        return bench_load(settings, args)
    if args.what == "widget":
        from agent.bench.widget import bench_widget

        return bench_widget(settings, args)
    from agent.bench.decoder import bench_decoder

    return bench_decoder(settings, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (default: $PARLEY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("models", help="list the models; --prepare assembles and verifies them")
    p.add_argument("--prepare", action="store_true", help="assemble split models into the cache")
    p.add_argument("--verify", action="store_true", help="re-hash files not yet verified")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("transcribe", help="print the transcript of an audio file")
    p.add_argument("file", type=Path)
    p.add_argument("--language", help="language code, or 'auto' (default: settings)")
    p.add_argument("--words", action="store_true", help="print word timings too")
    p.set_defaults(func=_cmd_transcribe)

    p = sub.add_parser("say", help="synthesise speech to a file")
    p.add_argument("text")
    p.add_argument("--voice", default=None, help="voice name (default: settings)")
    p.add_argument("--speed", type=float, default=1.0, help="0.25 to 4.0")
    p.add_argument("--format", default=None,
                   help="wav, mp3, flac, opus, aac, pcm16, g711_ulaw, g711_alaw "
                        "(default: from the output's extension, else wav)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=_cmd_say)

    p = sub.add_parser("generate", help="stream a reply from the language model")
    p.add_argument("prompt")
    p.add_argument("--model", help="smollm2, qwen2.5-coder-0.5b, or a .gguf path")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--backend", default=None,
                   help="auto, cpu, triton, reference, fp32 (default: llm_backend setting)")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("key-hash", help="print a key's hash for a [keys.<name>] table")
    p.add_argument("key", help="the API key, or - to read it from stdin (keeps it out of "
                               "the shell history)")
    p.set_defaults(func=_cmd_key_hash)

    p = sub.add_parser("bench", help="benchmarks whose tables go in the README")
    p.add_argument("what", choices=["speech", "decoder", "kernels", "gpu", "chat", "tools",
                                      "realtime", "quality", "phone", "widget", "load"])
    p.add_argument("--model", help="decoder, tools, quality: model name or .gguf path")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--backend", default=None,
                   help="realtime: the server's decoder backend (default: llm_backend setting)")
    p.add_argument("--verbose", action="store_true", help="quality: print every reply")
    p.add_argument("--minutes", type=float, default=None, help="load: how long (default 5)")
    p.add_argument("--sessions", type=int, default=None,
                   help="load: realtime callers at once (default 4)")
    p.add_argument("--chat-rps", type=float, default=None,
                   help="load: chat requests per second (default 0.5)")
    p.add_argument("--plot", type=Path, default=None, help="load: draw the run into this PNG")
    p.add_argument("--screenshots", type=Path, default=None,
                   help="widget: save the widget in each of its states to this folder")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config, host=getattr(args, "host", None),
                                 port=getattr(args, "port", None))
        return int(args.func(settings, args) or 0)
    except ParleyError as exc:
        print(f"parley: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
