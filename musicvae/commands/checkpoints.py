"""List the checkpoints of a run: `musicvae checkpoints checkpoints/music_vae_improved [--json]`.

Every file is read with torch.load(weights_only=True): listing never runs code from a checkpoint.
"""

import json
import sys
import time
from pathlib import Path


from musicvae.commands.parsing import command_parser, parse_command
from musicvae.training.checkpoints import list_checkpoints


def main(argv=None) -> int:
    parser = command_parser("checkpoints", __doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", type=str, help="folder holding best.ckpt / last.ckpt")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parse_command(parser, argv)
    folder = Path(args.checkpoint_dir)
    if not folder.is_dir():
        parser.error(f"{folder}: no such folder")
    rows = list_checkpoints(folder)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"{folder}: no checkpoints")
        return 0
    print(f"{'file':<16} {'epoch':>5} {'step':>8} {'monitor':<12} {'value':>10}  {'written':<19}  role")
    for row in rows:
        if "error" in row:
            print(f"{row['file']:<16} unreadable: {row['error']}")
            continue
        value = "-" if row["value"] is None else f"{row['value']:.5g}"
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["written"]))
        role = ", ".join(name for name in ("best", "last") if row[name])
        print(f"{row['file']:<16} {row['epoch']:>5} {row['global_step']:>8} {str(row['monitor']):<12} {value:>10}  {written}  {role}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
