"""The same Debian 12 root as a QEMU (TCG) guest with its own kernel: a full cgroup2 with every controller.

nspawn on these hosts gives cgroup2 without controllers (the host binds them to v1), so the systemd < 254
hazard "restart of a delegated unit whose subtree has controllers enabled and live children fails with
status=219/CGROUP" (systemd#24064) can only be shown here. Used by test_delegation_controllers.py (on by default,
GPUSHARE_TEST_QEMU=0 skips it; ~1.5-3.5 min per boot) and from a shell:

    python -m tests.system.qemu SCRIPT [FILES_DIR]     # boots, runs SCRIPT as root at boot, prints the log

The guest runs SCRIPT from a unit (its output goes to a second serial port, a file on the host), then
powers off; that output, then the console log, is the result. Files of FILES_DIR are copied to /usr/local/lib/probe/ in the guest.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.system import nspawn

VM = nspawn.CACHE / "vm"
KERNEL_PACKAGES = ("linux-image-cloud-amd64", "initramfs-tools", "zstd")


def ensure_kernel() -> tuple[Path, Path, Path]:
    """(vmroot, vmlinuz, initrd): the cached root plus a kernel, built once (about 2 min)."""
    root = nspawn.ensure_root()
    if shutil.which("qemu-system-x86_64") is None:
        env = {**nspawn.CLEAN_ENV, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"]
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # stale package lists: update once and try again
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise nspawn.HarnessError(f"installing qemu-system-x86 failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    VM.mkdir(parents=True, exist_ok=True)
    vmroot, vmlinuz, initrd = VM / "root", VM / "vmlinuz", VM / "initrd.img"
    key = nspawn.root_key() + "+" + ",".join(KERNEL_PACKAGES)
    with open(VM / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if vmlinuz.exists() and (VM / "key").exists() and (VM / "key").read_text() == key:
            return vmroot, vmlinuz, initrd
        shutil.rmtree(vmroot, ignore_errors=True)
        subprocess.run(["cp", "-a", str(root), str(vmroot)], check=True)
        script = f"apt-get update -q && apt-get install -y -q --no-install-recommends {' '.join(KERNEL_PACKAGES)} && apt-get clean"
        done = nspawn.run_isolated(
            ["systemd-nspawn", "-D", str(vmroot), "--register=no", "--keep-unit", "-q",
             "-E", "DEBIAN_FRONTEND=noninteractive", "sh", "-c", script],
            timeout=900,
        )  # fmt: skip
        kernels = sorted((vmroot / "boot").glob("vmlinuz-*"))
        initrds = sorted((vmroot / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise nspawn.HarnessError(
                f"kernel install failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        shutil.copy(kernels[-1], vmlinuz)
        shutil.copy(initrds[-1], initrd)
        (vmroot / "etc/fstab").write_text("/dev/vda / ext4 rw 0 1\n")
        (VM / "key").write_text(key)
    return vmroot, vmlinuz, initrd


def run_script(script: str, files: Path | None = None, timeout: float = 600) -> str:
    """Boot the guest, run ``script`` (sh) as root once the system is up, power off; return the console log."""
    vmroot, vmlinuz, initrd = ensure_kernel()
    work = Path(tempfile.mkdtemp(prefix="gpushare-qemu-", dir="/var/tmp"))
    try:
        tree = work / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(vmroot), str(tree)], check=True)
        probe = tree / "usr/local/lib/probe"
        probe.mkdir(parents=True, exist_ok=True)
        if files is not None:
            for item in files.iterdir():
                if item.is_file():
                    shutil.copy(item, probe / item.name)
        (probe / "run.sh").write_text("#!/bin/sh\nsystemctl is-system-running --wait >/dev/null\n" + script)
        (probe / "run.sh").chmod(0o755)
        unit = tree / "etc/systemd/system/probe.service"
        # Type=simple: the start job completes at once, so `is-system-running --wait` in the script can return.
        unit.write_text(
            "[Unit]\nAfter=multi-user.target\n[Service]\n"
            "ExecStart=/bin/sh -c '/usr/local/lib/probe/run.sh 2>&1 | sed \"s/^/PROBE: /\" > /dev/ttyS1; systemctl poweroff'\n"
            "[Install]\nWantedBy=multi-user.target\n"
        )
        wants = tree / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "probe.service").symlink_to("../probe.service")
        image = work / "vm.img"
        subprocess.run(["truncate", "-s", "3G", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
        shutil.rmtree(tree)
        argv = [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-m", "2048", "-smp", "2",
            "-nographic", "-no-reboot", "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1",
            "-drive", f"file={image},format=raw,if=virtio", "-nic", "none",
            # ttyS0: the console (a getty hangs it up); ttyS1: the script's output, straight to a file.
            "-serial", "mon:stdio", "-serial", f"file:{work / 'probe.out'}",
        ]  # fmt: skip
        console = Path(os.environ.get("GPUSHARE_QEMU_CONSOLE", str(work / "console.log")))
        with open(console, "wb") as out:
            try:
                subprocess.run(
                    argv, check=False, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout
                )
            except subprocess.TimeoutExpired:
                out.write(f"\nQEMU TIMEOUT after {timeout}s\n".encode())
        probe_out = work / "probe.out"
        text = probe_out.read_text(errors="replace") if probe_out.exists() else ""
        return text + console.read_text(errors="replace")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    text = run_script(Path(sys.argv[1]).read_text(), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    print("\n".join(line for line in text.splitlines() if "PROBE: " in line) or text[-5000:])
    sys.exit(0)
