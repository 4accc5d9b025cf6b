"""qsurgeon client: the public API models, the HTTP SDK and the command line.

This portion depends only on httpx and pydantic, so ``pip install qsurgeon`` gives a user
everything needed to submit jobs to a server without installing torch.
"""

from qsurgeon.client.errors import QsurgeonError, UsageError

__all__ = ["QsurgeonError", "UsageError"]
