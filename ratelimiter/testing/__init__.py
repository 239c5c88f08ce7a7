"""A fake OpenAI upstream that speaks real HTTP, for trying the sidecar with no provider
account; the tests and benchmarks use it too."""

from .fake_upstream import FakeUpstream, create_fake_upstream

__all__ = ["FakeUpstream", "create_fake_upstream"]
