"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class HtflError(Exception):
    """A problem with the user's input or environment, reported as one clear line."""


class Diverged(HtflError):
    """More than ``--failure-tolerance`` of a round's clients failed. The run's own
    outcome, not a fault to fix: its results are kept with status ``diverged``."""


class PluginError(HtflError):
    """A plugin failed to load or registered something inconsistent."""
