"""``cloneaware scan``: what PATHs occupy and how much of it is shared, from
their extent maps alone; with --save-map, also the sharing map that
``reshare --from`` gives back to a copy of the tree."""
from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, err, handled, human, progress
from cloneaware.cli.options import NoProgressOpt
from cloneaware.errors import UsageError


@app.command(cls=Command)
def scan(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...",
                                                help="Files and directories to scan.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    families: Annotated[int, typer.Option("--families", min=0, metavar="N",
                                          help="Show the N largest clone families.")] = 0,
    one_fs: Annotated[bool, typer.Option(
        "--one-file-system/--cross-filesystems",
        help="Stay on the filesystem of each PATH (the default), or descend into other "
        "mounted filesystems.")] = True,
    save_map: Annotated[str | None, typer.Option(
        "--save-map", metavar="MAP", help="Also write the sharing map of PATHs to MAP (- for "
        "standard output): which ranges share with which, and no data; give it to "
        "'cloneaware reshare --from MAP' on a copy of the tree.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing MAP.")]
    = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Report what PATHs occupy and how much of it is shared (reads no data)."""
    from cloneaware.scan import scan as do_scan

    with handled(as_json, to_stderr=save_map == "-"):
        opener = None
        if save_map is not None:
            from cloneaware.backup.sinks import file_output

            opener = file_output(save_map, force)  # refuse a bad MAP before scanning
        elif force:
            raise UsageError("--force is for --save-map")
        with progress(not as_json, None, "scanning") as prog:
            res = do_scan(paths, one_file_system=one_fs, progress=prog.advance,
                          tree=save_map is not None)
        for w in res.skipped:
            err(str(w))
        for note in res.notes():
            err(note)
        map_info = None
        if opener is not None and save_map is not None:
            from cloneaware.scan.sharemap import write_map

            out = opener()
            try:
                ms = write_map(res, out, "standard output" if save_map == "-" else save_map)
                out.commit()
            except BaseException:
                out.abort()
                raise
            map_info = {"path": save_map, **ms.as_dict()}
            if save_map != "-":
                map_info["bytes"] = os.path.getsize(save_map)
        # with the map on standard output, the report goes to standard error
        out_f = sys.stderr if save_map == "-" else sys.stdout

        def echo(msg: str = "") -> None:
            typer.echo(msg, file=out_f)

        if as_json:
            d = res.to_json(families)
            if map_info is not None:
                d["map"] = map_info
            echo(json.dumps(d, indent=2))
        else:
            t = res.plan.totals
            rows = [
                ("files", f"{t.files}"),
                ("extents", f"{t.extents}"),
                ("logical", human(t.logical_bytes)),
                ("holes", human(t.logical_bytes - t.data_bytes)),
                ("data", human(t.data_bytes)),
                ("physical", human(t.physical_bytes)),
                ("shared", human(t.shared_bytes)),
                ("shared outside the set", human(t.external_shared_bytes)),
            ]
            if t.encoded_bytes:
                rows.append(("compressed", human(t.encoded_bytes)))
                rows.append(("compressed, shared exactly (extent items)",
                             human(t.encoded_exact_bytes)))
            if t.encoded_candidate_bytes:
                rows.append(("compressed, same extent as an earlier file "
                              "(shared if the content matches)",
                              human(t.encoded_candidate_bytes)))
            if t.physical_bytes:
                rows.append(("saving (data / physical)",
                             f"{t.data_bytes / t.physical_bytes:.2f}x"))
            if res.anchors.files:
                rows.append(("anchors of backups (.cloneaware-anchors)",
                             f"{res.anchors.files} files pin {human(res.anchors.pinned_bytes)}"
                             + ("" if res.anchors.exact else " or more")))
            w = max(len(k) for k, _ in rows)
            for k, v in rows:
                echo(f"{k:<{w}}  {v}")
            if families:
                fams = res.plan.families()[:families]
                if fams:
                    echo("\nclone families (largest first):")
                for fam in fams:
                    info = res.family_info(fam)
                    echo(f"  {info['files']:>6} files  {human(info['logical_bytes']):>10}"
                         f" logical  {human(info['stored_bytes']):>10} own data"
                         f"  {info['first']} ...")
            if map_info is not None:
                echo(f"\nsharing map {save_map}: {map_info['files']} files, "
                     f"{map_info['references']} references to "
                     f"{human(map_info['referenced_bytes'])} shared"
                     + (f", {human(map_info['bytes'])}" if "bytes" in map_info else "")
                     + (f"; {human(map_info['unproved_bytes'])} of compressed ranges "
                        "left out (not proved shared without reading them)"
                        if map_info["unproved_bytes"] else ""))
        if res.skipped.exit_code():
            raise typer.Exit(res.skipped.exit_code())
