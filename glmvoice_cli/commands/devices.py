"""`glmvoice devices`: the microphones and speakers PortAudio sees, with the indexes to pick them.

No torch here; sounddevice is imported only when the command runs, so a missing PortAudio is a
one-line error from this command and nothing else.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from glmvoice_cli.audio.devices import DeviceInfo, list_devices

if TYPE_CHECKING:
    from rich.table import Table


def devices(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per device.")] = False,
) -> None:
    """List audio input and output devices; pass an index or a name to `chat --input-device/--output-device`."""
    infos = list_devices()
    if as_json:  # JSON Lines: no device is no line (a script reads an empty list); people get a note on stderr
        for info in infos:
            typer.echo(json.dumps(info.__dict__))
        if not infos:
            typer.echo("no audio devices found", err=True)
        return
    from rich.console import Console

    console = Console()
    if not infos:
        console.print("No audio devices found.")
        return
    console.print(device_table(infos))


def device_table(infos: list[DeviceInfo]) -> Table:
    """A Rich table: one row per device, defaults marked with '*'."""
    from rich.table import Table

    table = Table(title="Audio devices (* = default)")
    table.add_column("index", justify="right")
    table.add_column("name")
    table.add_column("host API")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_column("rate (Hz)", justify="right")
    for d in infos:
        mark_in = "*" if d.is_default_input else ""
        mark_out = "*" if d.is_default_output else ""
        table.add_row(
            str(d.index),
            d.name,
            d.host_api,
            f"{d.max_input_channels}{mark_in}" if d.max_input_channels else "-",
            f"{d.max_output_channels}{mark_out}" if d.max_output_channels else "-",
            f"{d.default_sample_rate:.0f}",
        )
    return table
