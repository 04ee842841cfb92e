"""The `command` kind: any CLI joins the council from config alone (`argv`, `{prompt}` substituted)."""

from __future__ import annotations

from .base import Adapter, Availability, Invocation, Job


class CommandAdapter(Adapter):
    kind = "command"

    @property
    def command(self) -> list[str]:
        return list(self.spec.argv or self.spec.command or [])

    def invocation(self, job: Job) -> Invocation:
        argv = [part.replace("{prompt}", job.prompt) for part in self.command]
        return self.make(argv, job)

    async def available(self) -> Availability:
        if not self.command:
            return Availability(False, f"agent {self.spec.name!r} is kind \"command\" but has no argv; "
                                       f"set [agents.{self.spec.name}] argv = [\"tool\", \"{{prompt}}\"]")
        return await super().available()
