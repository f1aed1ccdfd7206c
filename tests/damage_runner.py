"""Load each damaged model folder of a case list under a 4 GB address-space limit; report as JSON.

Run by tests/test_damage_corpus.py in a subprocess: `python damage_runner.py CASES.json RESULTS.json`.
Each case is {"name", "stage", "path"}; the result says whether loading ended in a one-line domain error
(as the CLI would show it), loaded, or crashed with another exception (a traceback for the user).
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ADDRESS_SPACE_BYTES = 4 << 30
CASE_SECONDS = 60


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def load(stage: str, path: Path) -> None:
    from glmvoice_cli.options import LoadOptions

    if stage == "lm":
        from glmvoice_cli.lm.voice_lm import VoiceLM

        VoiceLM.from_folder(path, LoadOptions(device="cpu", dtype="fp32"))
    elif stage == "decoder":
        from glmvoice_cli.decoder.checkpoint import load_decoder

        load_decoder(path)
    else:
        from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer

        SpeechTokenizer.from_pretrained(path, device="cpu")


def run_case(case: dict) -> dict:
    from glmvoice_cli.errors import GlmVoiceError

    start = time.monotonic()
    signal.alarm(CASE_SECONDS)
    try:
        load(case["stage"], Path(case["path"]))
        outcome, message = "loaded", ""
    except GlmVoiceError as e:
        outcome, message = "error", str(e)
    except _Timeout:
        outcome, message = "timeout", ""
    except BaseException as e:  # noqa: BLE001 - anything else would reach the user as a traceback
        outcome, message = "crash", "".join(traceback.format_exception(e))[-2000:]
    finally:
        signal.alarm(0)
    return {**case, "outcome": outcome, "message": message, "seconds": time.monotonic() - start}


def run_all(run: Callable[[dict], dict]) -> None:
    """argv: the cases' JSON, the results' JSON. Every case under the address-space limit, each with its alarm."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))
    signal.signal(signal.SIGALRM, _alarm)
    import torch

    torch.set_num_threads(1)
    cases = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    results = [run(case) for case in cases]
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1), encoding="utf-8")


def main() -> None:
    run_all(run_case)


if __name__ == "__main__":
    main()
