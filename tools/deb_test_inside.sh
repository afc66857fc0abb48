#!/bin/bash
# Run by tools/deb.sh test INSIDE the throwaway Debian root, where the .deb has
# just been installed with apt: checks the installed package as a user meets it.
# usage: deb_test_inside.sh MNT   (MNT: a loopback XFS or Btrfs mounted there)
# Prints one "ok" line per check; the first failure stops it with a non-zero exit.
set -euo pipefail
MNT=$1
n=0
ok() { n=$((n + 1)); printf 'deb-test: ok %2d  %s\n' "$n" "$*"; }
fail() { printf 'deb-test: FAILED: %s\n' "$*" >&2; exit 1; }
trap 'fail "line $LINENO: $BASH_COMMAND exited $?"' ERR
has() { grep -q -- "$2" <<<"$1" || fail "$3: expected '$2' in: $1"; }

# --- it is the packaged program that runs -----------------------------------
[ "$(command -v cloneaware)" = /usr/bin/cloneaware ] || fail "cloneaware is $(command -v cloneaware)"
[ "$(dpkg-query -S /usr/bin/cloneaware)" = "cloneaware: /usr/bin/cloneaware" ] \
    || fail "/usr/bin/cloneaware does not belong to the package"
head -n1 /usr/bin/cloneaware | grep -qx '#! */usr/bin/python3' || fail "shebang: $(head -n1 /usr/bin/cloneaware)"
mod=$(python3 -c 'import cloneaware.native, cloneaware; print(cloneaware.__file__)')
[ "$mod" = /usr/lib/python3/dist-packages/cloneaware/__init__.py ] || fail "imports $mod"
ok "/usr/bin/cloneaware from the package, module and native extension from $(dirname "$mod"), $(python3 --version)"

# --- files only where policy allows them --------------------------------------
bad=$(dpkg-query -L cloneaware | grep -Ev '^(/\.|/usr|/usr/bin(/cloneaware)?|/usr/lib|/usr/lib/python3(/dist-packages(/.*)?)?|/usr/lib/systemd(/system(/cloneaware@\.(service|timer))?)?|/usr/share|/usr/share/(doc|man|bash-completion|zsh|fish)(/.*)?)$' || true)
[ -z "$bad" ] || fail "files outside the allowed places: $bad"
ok "$(dpkg-query -L cloneaware | wc -l) paths, all under /usr/bin, /usr/lib/python3/dist-packages, /usr/lib/systemd/system/cloneaware@.{service,timer}, /usr/share/{doc,man,bash-completion,zsh,fish}"
dpkg-query -W -f '${Depends}\n${Recommends}\n' cloneaware | sed 's/^/deb-test:          /'

# --- the command line ------------------------------------------------------------
out=$(cloneaware --help)
for c in scan backup restore ls verify; do has "$out" "$c" "cloneaware --help"; done
ok "cloneaware --help lists scan, backup, restore, ls, verify"
out=$(cloneaware --version)
debver=$(dpkg-query -W -f '${Version}' cloneaware)
has "$out" "^cloneaware ${debver%-*}\$" "cloneaware --version"
has "$out" "archive format: writes" "cloneaware --version"
ok "cloneaware --version: $(tr '\n' ';' <<<"$out")"
rc=0; cloneaware restore /nonexistent.caw "$MNT/never" 2>/dev/null || rc=$?
[ "$rc" -ne 0 ] || fail "restore of a missing archive exited 0"
ok "a missing archive exits $rc"

# --- the man page ------------------------------------------------------------------
page=$(man -w cloneaware)
[ "$page" = /usr/share/man/man1/cloneaware.1.gz ] || fail "man -w cloneaware: $page"
text=$(MANWIDTH=80 man --warnings cloneaware 2>/tmp/man.err)
[ ! -s /tmp/man.err ] || fail "man reports: $(cat /tmp/man.err)"
for s in SYNOPSIS COMMANDS "EXIT STATUS" EXAMPLES GUARANTEES "cloneaware backup" "--base" 130; do
    has "$text" "$s" "man cloneaware"
done
if grep -qF '\[' <<<"$text"; then fail "man cloneaware shows markup escapes: $(grep -F '\[' <<<"$text")"; fi
ok "man -w cloneaware: $page; renders with no groff warning, $(wc -l <<<"$text") lines"

# --- completions: each shell finds the file where it looks and completes "ba" --
f=/usr/share/bash-completion/completions/cloneaware
out=$(bash -c "source $f && complete -p cloneaware")
has "$out" "_cloneaware_completion" "bash complete -p"
out=$(bash -c "source $f && COMP_WORDS=(cloneaware ba) COMP_CWORD=1 && _cloneaware_completion cloneaware && printf '%s\n' \"\${COMPREPLY[@]}\"")
has "$out" "^backup" "bash completion of 'cloneaware ba'"
out=$(bash -c "source $f && COMP_WORDS=(cloneaware backup --ba) COMP_CWORD=2 && _cloneaware_completion cloneaware && printf '%s\n' \"\${COMPREPLY[@]}\"")
has "$out" "^--base" "bash completion of 'cloneaware backup --ba'"
out=$(bash -c 'source /usr/share/bash-completion/bash_completion && _comp_load cloneaware && complete -p cloneaware')
has "$out" "_cloneaware_completion" "bash-completion loading it on demand"
ok "bash: $f loads on demand; 'cloneaware ba' -> backup, 'backup --ba' -> --base"

f=/usr/share/zsh/vendor-completions/_cloneaware
zsh -n "$f" || fail "zsh -n $f"
out=$(zsh -f -c 'autoload -Uz compinit && compinit -u -D && print -r -- $_comps[cloneaware]')
[ "$out" = _cloneaware ] || fail "zsh compinit maps cloneaware to '$out'"
out=$(_TYPER_COMPLETE_ARGS='cloneaware ba' _CLONEAWARE_COMPLETE=complete_zsh cloneaware)
has "$out" "backup" "zsh completion protocol for 'cloneaware ba'"
ok "zsh: $f found through the default fpath, parses; 'cloneaware ba' -> backup"

f=/usr/share/fish/vendor_completions.d/cloneaware.fish
fish --no-execute "$f" || fail "fish --no-execute $f"
out=$(fish -c 'complete --do-complete "cloneaware ba"')
has "$out" "^backup" "fish completion of 'cloneaware ba'"
out=$(fish -c 'complete --do-complete "cloneaware restore --tr"')
has "$out" "^--trust-base" "fish completion of 'cloneaware restore --tr'"
ok "fish: $f autoloaded; 'cloneaware ba' -> backup, 'restore --tr' -> --trust-base"

# --- a round trip on the loopback filesystem ------------------------------------------
fstype=$(stat -f -c %T "$MNT")
case $fstype in xfs|btrfs) ;; *) fail "$MNT is $fstype, not a reflink filesystem";; esac
src=$MNT/src/family
mkdir -p "$src/sub"
head -c 8M /dev/urandom > "$src/golden.img"
cp --reflink=always "$src/golden.img" "$src/clone1.img"
cp --reflink=always "$src/golden.img" "$src/sub/clone2.img"
printf 'this clone changed' | dd of="$src/sub/clone2.img" bs=1 seek=1048576 conv=notrunc status=none
echo hello > "$src/small.txt"
ln -s golden.img "$src/link"
sync

scan=$(cloneaware scan --json "$src")
shared=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["totals"]["shared_bytes"])' <<<"$scan")
[ "$shared" -gt 0 ] || fail "scan found nothing shared: $scan"
ok "scan on $fstype: $shared bytes shared"

cd /var/tmp
cloneaware backup -o family.caw "$src" 2>&1 | sed 's/^/deb-test:          /'
size=$(stat -c %s family.caw)
[ "$size" -lt $((12 * 1024 * 1024)) ] || fail "archive of 24 MiB of one clone family is $size bytes"
cloneaware verify family.caw | sed 's/^/deb-test:          /'
cloneaware ls family.caw >/dev/null
ok "family backup: 3 x 8 MiB clones -> a $((size / 1024)) KiB archive, verified, listed"

json=$(cloneaware restore --json family.caw "$MNT/restored")
diff -r --no-dereference "$src" "$MNT/restored/family" || fail "restored tree differs"
refl=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["reflinked_bytes"])' <<<"$json")
[ "$refl" -gt 0 ] || fail "restore reflinked nothing: $json"
shared=$(cloneaware scan --json "$MNT/restored" | python3 -c 'import json,sys; print(json.load(sys.stdin)["totals"]["shared_bytes"])')
[ "$shared" -gt 0 ] || fail "the restored family shares nothing"
ok "restore: identical tree, $refl bytes reflinked, $shared bytes shared again"

cloneaware backup -o - "$src" 2>/dev/null | cloneaware restore - "$MNT/piped" >/dev/null
diff -r --no-dereference "$src" "$MNT/piped/family" || fail "piped round trip differs"
ok "backup -o - | restore -: identical tree"

cloneaware backup --base "$src/golden.img" -o thin.caw "$src/sub/clone2.img" >/dev/null
thin=$(stat -c %s thin.caw)
[ "$thin" -lt $((1024 * 1024)) ] || fail "thin backup of a one-range change is $thin bytes"
cloneaware restore --base "$src/golden.img" thin.caw "$MNT/thin" >/dev/null
cmp "$src/sub/clone2.img" "$MNT/thin/clone2.img" || fail "thin restore differs"
ok "thin backup against the base: $thin bytes; restored identical"

# --- the nightly job: its man page, example, units, and a run of it ------------------------
page=$(man -w cloneaware.toml)
[ "$page" = /usr/share/man/man5/cloneaware.toml.5.gz ] || fail "man -w cloneaware.toml: $page"
text=$(MANWIDTH=80 man --warnings 5 cloneaware.toml 2>/tmp/man5.err)
[ ! -s /tmp/man5.err ] || fail "man 5 cloneaware.toml reports: $(cat /tmp/man5.err)"
for s in KEYS keep-daily on-failure CLONEAWARE_STEP cloneaware_last_success_timestamp_seconds; do
    has "$text" "$s" "man 5 cloneaware.toml"
done
if grep -qF '\[' <<<"$text"; then fail "man 5 cloneaware.toml shows markup escapes"; fi
ok "man 5 cloneaware.toml: $page, $(wc -l <<<"$text") lines, no groff warning"
mkdir -p /var/tmp/units && cd /var/tmp/units
for u in service timer; do
    f=/usr/lib/systemd/system/cloneaware@.$u
    [ "$(dpkg-query -S "$f")" = "cloneaware: $f" ] || fail "$f is not the package's"
    ln -sf "$f" "cloneaware@home.$u"
done
systemd-analyze verify --man=no ./cloneaware@home.service ./cloneaware@home.timer >/tmp/verify.out 2>&1 \
    || fail "systemd-analyze verify: $(cat /tmp/verify.out)"
[ ! -s /tmp/verify.out ] || fail "systemd-analyze verify warns: $(cat /tmp/verify.out)"
ok "cloneaware@.service and cloneaware@.timer pass systemd-analyze verify ($(systemd-analyze --version | head -n1))"
cd /var/tmp
cloneaware init -r "$MNT/repo" >/dev/null
cat > nightly.toml <<EOF
[defaults]
repository = "$MNT/repo"
keep-last = 2
[jobs.family]
paths = ["$src"]
check-read-data-every = "30d"
EOF
for night in 1 2 3; do
    out=$(CLONEAWARE_STATE_DIR=/var/tmp/state cloneaware run -c nightly.toml --metrics /var/tmp/m.prom)
done
has "$out" "family: forget: removed 1 snapshots, kept 2" "the third run"
has "$out" "family: check: not due" "the third run"
grep -q '^cloneaware_exit_code{job="family"} 0$' /var/tmp/m.prom || fail "metrics: $(cat /var/tmp/m.prom)"
ex=/usr/share/doc/cloneaware/examples/cloneaware.toml.example
python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$ex" || fail "$ex is not TOML"
ok "cloneaware run: three nights of a job (forget keeps 2, check not due again), metrics; $ex parses"

echo "deb-test: all $n checks passed"
