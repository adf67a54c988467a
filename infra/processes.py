"""The machine's processes as Linux's /proc shows them: parents, trees, sessions, CPU time, peak memory, command
lines. The one reader of /proc for the local stack, the benchmarks and the tests (Ray spreads a job over many
processes, and stopping or measuring "ours" means walking them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessStat", "process_stat", "all_process_stats", "process_tree", "processes_mentioning",
           "is_running", "peak_rss_mib", "status_kib", "command_line", "cpu_seconds"]

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessStat:
    """The fields of /proc/<pid>/stat that we use."""

    pid: int
    state: str  # "R", "S", ..., "Z" for a zombie
    ppid: int
    session: int
    utime_ticks: int
    stime_ticks: int


def process_stat(pid: int) -> ProcessStat | None:
    """None when the process is gone (or was never there)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces and ')'; the fields after its last ')' are fixed:
    # state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt, majflt, cmajflt, utime, stime, ...
    fields = text.rsplit(")", 1)[1].split()
    return ProcessStat(pid=pid, state=fields[0], ppid=int(fields[1]), session=int(fields[3]),
                       utime_ticks=int(fields[11]), stime_ticks=int(fields[12]))


def all_process_stats() -> list[ProcessStat]:
    stats = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            stat = process_stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def process_tree(root: int) -> set[int]:
    """`root` and every descendant of it; empty when `root` is gone."""
    children: dict[int, list[int]] = {}
    alive = set()
    for stat in all_process_stats():
        alive.add(stat.pid)
        children.setdefault(stat.ppid, []).append(stat.pid)
    if root not in alive:
        return set()
    tree, frontier = {root}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def command_line(pid: int) -> str | None:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace")
    except OSError:
        return None


def processes_mentioning(text: str) -> set[int]:
    """Processes (other than this one) whose command line contains `text`, with their trees."""
    found = {stat.pid for stat in all_process_stats()
             if stat.pid != os.getpid() and text in (command_line(stat.pid) or "")}
    trees = set()
    for pid in found:
        trees |= process_tree(pid)
    return found | trees


def is_running(pid: int) -> bool:
    """True for a live process (a zombie counts as ended)."""
    stat = process_stat(pid)
    return stat is not None and stat.state != "Z"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    stat = process_stat(pid)
    if stat is None:
        raise ProcessLookupError(pid)
    return (stat.utime_ticks + stat.stime_ticks) / os.sysconf("SC_CLK_TCK")


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM, ...) in KiB; None when the process is gone."""
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM) in MiB; None when it is gone."""
    peak = status_kib("VmHWM", pid)
    return peak / 1024 if peak is not None else None
