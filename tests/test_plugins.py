"""The plugin system: built-ins and third-party distributions load the same way."""

from __future__ import annotations

import h5py

from htfl_plugins.plugins import get_plugins
from tests.helpers import htfl, make_distribution, readme_plugin_example


def test_builtins_registered_through_entry_points():
    plugins = get_plugins()
    algos = plugins.registry("algorithms")
    assert {"local", "fedktl"} <= set(algos.names())
    assert algos.get("local").plugin == "baselines"
    assert algos.get("fedktl").plugin == "fedktl"
    assert "HtFE-img-8" in plugins.registry("groups")
    assert {"iid", "pat", "dir", "exdir"} <= set(plugins.registry("partitioners").names())
    assert "dcgan-face" in plugins.registry("generators")


def test_list_prints_items_with_summaries():
    out = htfl("list", "algorithms")
    assert out.returncode == 0, out.stderr
    assert any(line.startswith("local ") and "alone" in line for line in out.stdout.splitlines())
    out = htfl("list", "groups")
    assert "HtFE-img-8" in out.stdout and "ResNet152" in out.stdout


def test_readme_plugin_runs_as_an_installed_distribution(tmp_path):
    site = make_distribution(tmp_path / "site", "htfl_hello", "htfl_hello",
                             readme_plugin_example(), {"hello": "htfl_hello"})
    env = {"PYTHONPATH": str(site)}
    listed = htfl("list", "algorithms", env_extra=env)
    assert "hello" in listed.stdout and "[hello]" in listed.stdout
    helped = htfl("run", "--algo", "hello", "--help", env_extra=env)
    assert "--mix" in helped.stdout
    out = tmp_path / "out"
    done = htfl("run", "--algo", "hello", "--mix", "0.5", "--dataset", "digits", "--clients", 3,
                "--rounds", 2, "--out", out, "-q", env_extra=env)
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("*.h5")
    with h5py.File(path) as f:
        assert f.attrs["algorithm"] == "hello"
        assert len(f["rs_test_acc"]) == 3
        # every selected client uploads its head (10×512 + 10 floats) in each training round
        assert list(f["upload_bytes"][1:]) == [3 * (10 * 512 + 10) * 4] * 2
        # row r sends round r+1 the mean head, once there is one
        assert list(f["download_bytes"]) == [0] + [3 * (10 * 512 + 10) * 4] * 2


def test_duplicate_name_names_both_plugins(tmp_path):
    code = ("from htfl_plugins import hookimpl\n"
            "from baselines.local import LocalServer, LocalClient\n"
            "@hookimpl\n"
            "def register_algorithms(register):\n"
            "    register('local', server=LocalServer, client=LocalClient, summary='dup')\n")
    site = make_distribution(tmp_path, "dupe", "dupe_plugin", code, {"dupe": "dupe_plugin"})
    out = htfl("list", "algorithms", env_extra={"PYTHONPATH": str(site)})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "'local' is registered twice" in out.stderr
    assert "'baselines'" in out.stderr and "'dupe'" in out.stderr


def test_broken_plugin_is_named(tmp_path):
    site = make_distribution(tmp_path, "broken", "broken_plugin", "raise ImportError('no numpy 3')\n",
                             {"broken": "broken_plugin"})
    out = htfl("list", "algorithms", env_extra={"PYTHONPATH": str(site)})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "plugin 'broken'" in out.stderr and "no numpy 3" in out.stderr


def test_misspelled_hook_fails_loudly(tmp_path):
    code = ("from htfl_plugins import hookimpl\n"
            "@hookimpl\n"
            "def register_algorithm(register):\n"
            "    pass\n")
    site = make_distribution(tmp_path, "typo", "typo_plugin", code, {"typo": "typo_plugin"})
    out = htfl("list", "algorithms", env_extra={"PYTHONPATH": str(site)})
    assert out.returncode == 2
    assert "register_algorithm" in out.stderr and "unknown hook" in out.stderr


def test_plugin_subcommand_and_plugin_kinds_are_listed(tmp_path):
    code = ("from htfl_plugins import hookimpl\n"
            "@hookimpl\n"
            "def register_commands(subparsers):\n"
            "    p = subparsers.add_parser('hello', help='say hello')\n"
            "    p.add_argument('--name', default='world')\n"
            "    p.set_defaults(func=lambda args: print('hello', args.name))\n")
    site = make_distribution(tmp_path, "greet", "greet_plugin", code, {"greet": "greet_plugin"})
    out = htfl("hello", "--name", "htfl", env_extra={"PYTHONPATH": str(site)})
    assert out.returncode == 0 and out.stdout.strip() == "hello htfl"
    listed = htfl("list", "generators")
    assert listed.returncode == 0 and "dcgan-face" in listed.stdout and "[fedktl]" in listed.stdout


def test_a_client_that_always_raises_finishes_without_traceback(tmp_path):
    code = ("from htfl_plugins import hookimpl\n"
            "from baselines.local import LocalClient, LocalServer, LocalOptions\n"
            "class Flaky(LocalClient):\n"
            "    def train(self):\n"
            "        if self.cid == 2:\n"
            "            raise RuntimeError('sensor unplugged')\n"
            "        return super().train()\n"
            "@hookimpl\n"
            "def register_algorithms(register):\n"
            "    register('flaky', server=LocalServer, client=Flaky, options=LocalOptions, summary='x')\n")
    site = make_distribution(tmp_path / "site", "flaky", "flaky_plugin", code, {"flaky": "flaky_plugin"})
    out = tmp_path / "out"
    done = htfl("run", "--algo", "flaky", "--dataset", "digits", "--clients", 4, "--rounds", 3, "--out", out,
                "--name", "f", "-q", env_extra={"PYTHONPATH": str(site)})
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert done.stderr.count("client 2 (MLP) failed and is left out of this round: RuntimeError: sensor "
                             "unplugged") == 3
    from htfl_plugins.results import read_run

    r = read_run(out / "f.h5")
    assert r["attrs"]["status"] == "finished" and list(r["failed_clients"]) == [0, 1, 1, 1]
