#!/usr/bin/env python3
"""``make soak`` (issue 33): a month of nights that must lose nothing, in
minutes.  Two hosts back up changing trees into one repository, a local
one and an s3:// one on a Ceph gateway started for the run; every 7th
night ``forget --keep-daily 7 --keep-weekly 4 --prune``; a backup and a
prune killed with SIGKILL at random moments; the gateway stopped for
several seconds while a backup runs; one pack damaged and repaired
(``check --read-data``, ``repair packs``, the next backups heal).  At the
end every snapshot still listed that a backup reported complete is
restored and hashed against the tree it was made of, and ``check
--read-data`` must pass.  Prints what it did and what it found; exit 0
only if nothing was lost.

    python3 tools/soak.py [--nights 30] [--seed N] [--no-s3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers.ceph import Ceph  # noqa: E402
from helpers.ceph import missing as ceph_missing  # noqa: E402

CA = [sys.executable, "-P", "-m", "cloneaware"]
KiB, MiB = 1 << 10, 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Host:
    """A host: its tree, its state directory, and what it backed up."""

    def __init__(self, name: str, root: Path, rng: random.Random):
        self.name = name
        self.tree = root / name / "data"
        self.state = root / name / "state"
        self.rng = rng
        self.tree.mkdir(parents=True)
        self.state.mkdir(parents=True)
        for i in range(40):
            self._write(self.tree / f"d{i % 5}" / f"f{i}.txt", rng.randrange(100, 20 * KiB))
        self._write(self.tree / "big.img", 6 * MiB)

    def _write(self, p: Path, n: int) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.rng.randbytes(n))

    def change(self) -> None:
        """A night's changes: edits, new files, deletions, a rename, blocks
        of the big file rewritten."""
        files = sorted(p for p in self.tree.rglob("*") if p.is_file() and p.name != "big.img")
        for p in self.rng.sample(files, min(4, len(files))):
            p.write_bytes(p.read_bytes()[: self.rng.randrange(1, 4000)] + self.rng.randbytes(50))
        for _ in range(2):
            self._write(self.tree / f"d{self.rng.randrange(5)}" / f"n{self.rng.randrange(10**6)}",
                        self.rng.randrange(10, 30 * KiB))
        if len(files) > 30:
            self.rng.choice(files).unlink()
        a = self.rng.choice(files)
        if a.exists():
            a.rename(a.with_name(a.name + ".r"))
        with open(self.tree / "big.img", "r+b") as f:
            for _ in range(3):
                f.seek(self.rng.randrange(6 * MiB // 4096) * 4096)
                f.write(self.rng.randbytes(4096))

    def digest(self, top: Path | None = None) -> dict[str, str]:
        top = top or self.tree
        return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(top.rglob("*")) if p.is_file()}

    def env(self, base: dict) -> dict:
        return {**base, "CLONEAWARE_STATE_DIR": str(self.state)}


class Soak:
    def __init__(self, repo: str, root: Path, env: dict, rng: random.Random, nights: int,
                 ceph: Ceph | None):
        self.repo, self.root, self.env, self.rng, self.nights = repo, root, env, rng, nights
        self.ceph = ceph
        self.hosts = [Host(n, root, rng) for n in ("alpha", "beta")]
        self.made: dict[str, dict[str, str]] = {}  # snapshot id -> digest of its tree
        self.events: list[str] = []
        self.kill_backup = rng.randrange(2, nights)
        self.kill_prune = rng.choice([n for n in range(7, nights + 1, 7)] or [nights])
        self.outage = rng.randrange(2, nights) if ceph is not None else -1
        self.damage = rng.randrange(3, nights)

    def ca(self, *args, host: Host | None = None, check=(0,)) -> subprocess.CompletedProcess:
        env = host.env(self.env) if host else self.env
        r = subprocess.run(CA + [str(a) for a in args], env=env, capture_output=True)
        if check is not None and r.returncode not in check:
            raise SystemExit(f"soak: cloneaware {' '.join(map(str, args))}: exit "
                             f"{r.returncode}: {r.stderr.decode()[-2000:]}")
        return r

    def backup(self, h: Host, night: int) -> None:
        digest = h.digest()
        args = [*CA, "backup", "--json", "-q", "--host", h.name, "-r", self.repo, h.tree]
        p = subprocess.Popen(args, env=h.env(self.env), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        if night == self.kill_backup and h.name == "alpha":
            time.sleep(self.rng.uniform(0.05, 1.0))
            p.send_signal(signal.SIGKILL)
            p.wait()
            self.events.append(f"night {night}: a backup of {h.name} killed (SIGKILL)")
            self.ca("unlock", "-r", self.repo, host=h, check=(0, 1))
            return
        if night == self.outage and h.name == "beta":
            threading.Thread(target=self._outage, daemon=True).start()
        out, err = p.communicate()
        if p.returncode in (0, 1):
            sid = json.loads(out)["snapshot"]
            self.made[sid] = digest
        else:
            self.events.append(f"night {night}: a backup of {h.name} failed, exit "
                               f"{p.returncode}: {err.decode().strip()[-300:]}")

    def _outage(self) -> None:
        assert self.ceph is not None
        time.sleep(0.3)
        self.ceph.stop_rgw()
        time.sleep(self.rng.uniform(4, 8))
        self.ceph.start_rgw()
        self.events.append(f"night {self.outage}: the gateway stopped for several seconds "
                           "during a backup")

    def forget(self, night: int) -> None:
        args = [*CA, "forget", "-q", "-r", self.repo, "--keep-daily", "7", "--keep-weekly",
                "4", "--prune"]
        p = subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        if night == self.kill_prune:
            time.sleep(self.rng.uniform(0.2, 1.5))
            p.send_signal(signal.SIGKILL)
            p.wait()
            self.events.append(f"night {night}: forget --prune killed (SIGKILL)")
            self.ca("unlock", "-r", self.repo, check=(0, 1))
            return
        _, err = p.communicate()
        if p.returncode not in (0, 1):
            raise SystemExit(f"soak: forget --prune: exit {p.returncode}: {err.decode()}")

    def damage_a_pack(self, night: int) -> None:
        """A byte flipped in the pack that holds tonight's new file (its
        bytes stored as they are: random, not compressed), so that what is
        lost is still in the source; check names it, repair packs salvages
        the rest of the pack, and the next backup of that host heals it."""
        h = self.hosts[0]
        needle = (h.tree / "fresh.bin").read_bytes()[:4096]
        for name in self._packs():
            data = bytearray(self._read(name))
            at = data.find(needle)
            if at >= 0:
                break
        else:
            raise SystemExit("soak: tonight's new file is in no pack")
        data[at + 100] ^= 0xFF
        self._write(name, bytes(data))
        r = self.ca("check", "--read-data", "-r", self.repo, check=(3,))
        named = "data/fresh.bin" in r.stderr.decode()
        r = self.ca("repair", "packs", "--json", "-r", self.repo, "--aside",
                    self.root / "aside")
        out = json.loads(r.stdout)
        self.backup(h, night)  # heals: the lost blob is stored again
        self.events.append(f"night {night}: a byte of pack {name[-64:][:12]} flipped; check "
                           f"{'named' if named else 'DID NOT NAME'} the file, repair packs "
                           f"salvaged {out['salvaged']} blobs and lost {len(out['lost'])}, "
                           "the next backup stored it again")

    def _packs(self) -> list[str]:
        if self.repo.startswith("s3://"):
            assert self.ceph is not None
            bucket, prefix = self.repo[5:].split("/", 1)
            return sorted(o["Key"] for o in self.ceph.s3().list_objects_v2(
                Bucket=bucket, Prefix=prefix + "/data/")["Contents"])
        return sorted(str(p) for p in Path(self.repo, "data").rglob("*/*"))

    def _read(self, name: str) -> bytes:
        if self.repo.startswith("s3://"):
            assert self.ceph is not None
            return self.ceph.s3().get_object(Bucket=self.repo[5:].split("/")[0],
                                             Key=name)["Body"].read()
        return Path(name).read_bytes()

    def _write(self, name: str, data: bytes) -> None:
        if self.repo.startswith("s3://"):
            assert self.ceph is not None
            self.ceph.s3().put_object(Bucket=self.repo[5:].split("/")[0], Key=name, Body=data)
        else:
            Path(name).write_bytes(data)

    def run(self) -> bool:
        self.ca("init", "-r", self.repo, "--pack-size", "1")
        t0 = time.monotonic()
        for night in range(1, self.nights + 1):
            for h in self.hosts:
                h.change()
                if night == self.damage and h is self.hosts[0]:
                    h._write(h.tree / "fresh.bin", 2 * MiB)
                self.backup(h, night)
            if night == self.damage:
                self.damage_a_pack(night)
            if night % 7 == 0:
                self.forget(night)
        left = json.loads(self.ca("snapshots", "--json", "-r", self.repo).stdout)
        ok = True
        checked = 0
        for s in left:
            want = self.made.get(s["id"])
            if want is None:
                continue  # a snapshot whose backup did not report (killed): not promised
            dest = self.root / "restore" / s["short_id"]
            self.ca("restore", "-q", "-r", self.repo, s["id"], dest)
            got = self.hosts[0].digest(dest / "data")
            checked += 1
            if got != want:
                ok = False
                log(f"LOST: snapshot {s['short_id']} does not restore as its tree was")
            shutil.rmtree(dest)
        r = self.ca("check", "--read-data", "-r", self.repo, check=None)
        if r.returncode != 0:
            ok = False
            log(f"LOST: check --read-data exit {r.returncode}: {r.stderr.decode()[-1000:]}")
        for e in self.events:
            log(f"  {e}")
        log(f"{self.repo}: {self.nights} nights, {len(self.made)} backups reported complete, "
            f"{len(left)} snapshots left after forget, {checked} restored and hashed: "
            f"{'all exact' if ok else 'NOT ALL EXACT'}; check --read-data "
            f"{'passed' if r.returncode == 0 else 'FAILED'}; {time.monotonic() - t0:.0f} s")
        return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nights", type=int, default=30)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    log(f"soak: seed {args.seed}, {args.nights} nights")
    root = Path(tempfile.mkdtemp(prefix="cloneaware-soak-"))
    ceph = None
    ok = True
    try:
        env = {**os.environ, "CLONEAWARE_S3_RETRY_SECONDS": "30"}
        rng = random.Random(args.seed)
        ok &= Soak(str(root / "local" / "repo"), root / "local", env, rng, args.nights,
                   None).run()
        if not args.no_s3:
            why = ceph_missing()
            if why:
                log(f"no s3:// soak: {why}")
            else:
                (root / "ceph").mkdir()
                ceph = Ceph(root / "ceph").start()
                env = {**env, **ceph.env}
                ok &= Soak("s3://soak/repo", root / "s3", env, rng, args.nights, ceph).run()
    finally:
        if ceph is not None:
            ceph.close()
        shutil.rmtree(root, ignore_errors=True)
    log("soak: " + ("nothing lost" if ok else "SOMETHING WAS LOST"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
