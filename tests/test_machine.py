"""The machine's identity (part of every generation's cost-cache key) is probed once per process."""

import subprocess

from mlx_gemma_mtp import machine

PROBES = (machine.cpu_model, machine.gpu_name, machine.blas_library)


def test_identity_is_probed_once_per_process(monkeypatch):
    calls = []

    def sysctl(args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="Apple M9\n", stderr="")

    monkeypatch.setattr(machine.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(machine.subprocess, "run", sysctl)
    for probe in PROBES:
        probe.cache_clear()
    try:
        identities = [machine.speed_identity() for _ in range(3)]
    finally:
        for probe in PROBES:  # nothing of the pretended Mac stays cached
            probe.cache_clear()
    assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]
    assert [identity["cpu"] for identity in identities] == ["Apple M9"] * 3
