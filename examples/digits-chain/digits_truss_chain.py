"""A chain that calls an existing truss: examples/digits, unchanged, as a `TrussChainlet`. The
entrypoint reaches it through the `TrussHandle` a deployed chain gives it (its URL and the chain's
key), and sends it what the digits truss takes.

    chain = truss_lab.load_chain("examples/digits-chain/digits_truss_chain.py")
    chain.run(image_b64=base64.b64encode(png_bytes).decode(), top_k=3)
"""

import httpx
import truss_chains as chains
from truss_chains.remote_chainlet.truss_chainlet import TrussHandle


class DigitsTruss(chains.TrussChainlet):
    truss_dir = "../digits"  # the truss folder, as it is


@chains.mark_entrypoint
class TrussDigits(chains.ChainletBase):
    remote_config = chains.RemoteConfig(
        docker_image=chains.DockerImage(pip_requirements=["httpx"]),
        compute=chains.Compute(cpu_count=1, predict_concurrency=8),
    )

    def __init__(self, digits: TrussHandle = chains.depends(DigitsTruss)):
        self._digits = digits

    async def run_remote(self, image_b64: str, top_k: int = 3) -> dict[str, float]:
        url, headers = self._digits.http_call_args()
        body = {"image": f"data:image/png;base64,{image_b64}", "top_k": top_k}
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        return response.json()["predictions"]
