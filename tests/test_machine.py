"""The machine: physical cores from /proc/cpuinfo text (the default thread count everywhere)."""

import os

from oatoplan.machine import default_threads, physical_cores


def _cpuinfo(pairs: list[tuple[int, int]]) -> str:
    """/proc/cpuinfo text with one block per logical CPU, given its (physical id, core id)."""
    return "\n".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nphysical id\t: {socket}\nsiblings\t: 4\n"
                     f"core id\t\t: {core}\ncpu cores\t: 2\nflags\t\t: fpu sse2 avx2\n"
                     for i, (socket, core) in enumerate(pairs))


def test_hyperthreads_count_once():
    # 2 cores x 2 hyperthreads: CPUs 0 and 2 share core 0, 1 and 3 share core 1
    assert physical_cores(_cpuinfo([(0, 0), (0, 1), (0, 0), (0, 1)])) == 2


def test_cores_of_two_sockets_are_different_cores():
    assert physical_cores(_cpuinfo([(0, 0), (0, 1), (1, 0), (1, 1)])) == 4


def test_only_the_cpus_this_process_may_use():
    text = _cpuinfo([(0, 0), (0, 1), (0, 2), (0, 3), (0, 0), (0, 1), (0, 2), (0, 3)])
    assert physical_cores(text, allowed={0, 4}) == 1
    assert physical_cores(text, allowed={0, 1, 5}) == 2


def test_one_core_per_vcpu_as_virtual_machines_report_it():
    assert physical_cores(_cpuinfo([(0, core) for core in range(16)])) == 16


def test_no_core_ids_means_unknown():
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\n\nprocessor\t: 1\nBogoMIPS\t: 50.00\n"
    assert physical_cores(arm) is None
    assert physical_cores("") is None


def test_default_threads_on_this_machine():
    assert 1 <= default_threads() <= (os.cpu_count() or 1)
    with open("/proc/cpuinfo") as f:
        cores = physical_cores(f.read(), os.sched_getaffinity(0))
    assert default_threads() == (cores or len(os.sched_getaffinity(0)))
