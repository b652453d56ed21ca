"""Command line of the emulator: serve the emulated Gemini API in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import signal

from runtime.emulator.config import EmulatorConfig
from runtime.emulator.server import Emulator


def _limit(text: str) -> int | None:
    """A quota limit; "none" (or "unlimited") lifts it."""
    if text.lower() in ("none", "unlimited"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("limits must be >= 0")
    return value


def _model_quota(text: str) -> tuple[str, tuple[int | None, int | None]]:
    model, sep, limits = text.partition("=")
    rpm, comma, tpm = limits.partition(",")
    if not (model and sep and comma):
        raise argparse.ArgumentTypeError("expected MODEL=RPM,TPM")
    return model, (_limit(rpm), _limit(tpm))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = EmulatorConfig()
    parser.add_argument("--host", default=defaults.host, help="address to bind")
    parser.add_argument("--port", type=int, default=8765, help="port to bind (0: any free port)")
    parser.add_argument("--rpm", type=_limit, default=defaults.rpm, help="requests per window")
    parser.add_argument("--tpm", type=_limit, default=defaults.tpm, help="tokens per window")
    parser.add_argument(
        "--window-s", type=float, default=defaults.window_s, help="rolling window length, seconds"
    )
    parser.add_argument(
        "--tpm-counts",
        choices=("input", "total"),
        default=defaults.tpm_counts,
        help=(
            'which tokens the TPM quota counts: "total" counts input + output (+ thinking) '
            'tokens of each call, "input" only its prompt tokens (Google\'s rule); '
            "default: %(default)s"
        ),
    )
    parser.add_argument(
        "--latency-ms", type=float, default=defaults.latency_ms, help="base latency per call"
    )
    parser.add_argument(
        "--latency-per-token-ms",
        type=float,
        default=defaults.latency_per_output_token_ms,
        help="extra latency per reported (scaled) output token",
    )
    parser.add_argument(
        "--processing-polls",
        type=int,
        default=defaults.processing_polls,
        help="files.get replies showing PROCESSING before a file is ACTIVE",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of all answers")
    parser.add_argument(
        "--output-scale",
        type=float,
        default=defaults.output_scale,
        help=(
            "mean multiplier of every answer's output token count (what usage, the TPM quota, "
            "the per-token latency and the stats see; the text is unchanged)"
        ),
    )
    parser.add_argument(
        "--output-cv",
        type=float,
        default=defaults.output_cv,
        help=(
            "coefficient of variation of that multiplier: each call draws it from a lognormal "
            "of mean --output-scale, seeded by --seed, the request and how often it was "
            "answered before (0: exactly --output-scale)"
        ),
    )
    parser.add_argument(
        "--model-quota",
        type=_model_quota,
        action="append",
        default=[],
        metavar="MODEL=RPM,TPM",
        help="quota of one model (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        rpm=args.rpm,
        tpm=args.tpm,
        window_s=args.window_s,
        tpm_counts=args.tpm_counts,
        latency_ms=args.latency_ms,
        latency_per_output_token_ms=args.latency_per_token_ms,
        processing_polls=args.processing_polls,
        seed=args.seed,
        output_scale=args.output_scale,
        output_cv=args.output_cv,
        model_quotas=dict(getattr(args, "model_quota", [])),
    )


async def serve(config: EmulatorConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        async with Emulator(config) as emulator:
            print(f"Gemini emulator listening on {emulator.base_url}", flush=True)
            await stopping.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"emulator: {exc}")
        return 2
    asyncio.run(serve(config))
    return 0
