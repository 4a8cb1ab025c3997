"""vLLM's Ray executor and worker actor, made to run on the CPU platform.

vLLM 0.32/0.33 refuse ``--distributed-executor-backend ray`` on CPU: the
platform has no Ray resource key and the actors ask Ray for accelerator ids.
On CPU, ``runtime_patches`` hands vLLM the executor in place of
``RayExecutorV2``, which makes vLLM spawn ``CpuRayWorkerProc`` actors. They live at module level because Ray
and vLLM pickle classes by reference: the engine-core process and every actor
process import them from here.
"""

from __future__ import annotations

import ray
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

from vllm_pp.integration.vllm_compat import RAY_CPU_RESOURCE


class CpuRayWorkerProc(RayWorkerProc):
    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        # A CPU worker owns no accelerator ids; the executor then derives each
        # worker's local rank from the node ids alone.
        return ray.get_runtime_context().get_node_id(), []


class CpuRayExecutorV2(RayExecutorV2):
    def _init_executor(self) -> None:
        _use_cpu_ray_workers()
        # vLLM creates a placement group unless it is given one, and never removes
        # it: on a long-lived cluster the next engine would wait for its CPUs.
        owns_group = (
            self.parallel_config.placement_group is None
            and ray.util.get_current_placement_group() is None
        )
        try:
            super()._init_executor()
        except BaseException:
            self._owned_placement_group = owns_group and self.parallel_config.placement_group
            self.shutdown()  # a worker that failed start-up must not hold the CPUs either
            raise
        self._owned_placement_group = owns_group and self.parallel_config.placement_group

    def shutdown(self) -> None:
        super().shutdown()
        group, self._owned_placement_group = getattr(self, "_owned_placement_group", None), None
        if group and ray.is_initialized():
            ray.util.remove_placement_group(group)

    @staticmethod
    def _get_actor_resource_kwargs() -> dict:
        # vLLM creates each actor with num_cpus=0 inside a placement-group bundle
        # that reserves the worker's CPU; Ray refuses "CPU" as a custom resource.
        return {"num_gpus": 0}


def _use_cpu_ray_workers() -> None:
    """Run by ``CpuRayExecutorV2`` in the engine-core process before Ray starts.

    Gives the CPU platform a Ray resource key (read by vLLM's placement-group
    code) and makes the executor spawn ``CpuRayWorkerProc`` actors, which it
    looks up in its own module.
    """
    from vllm.platforms import current_platform
    from vllm.v1.executor import ray_executor_v2

    type(current_platform).ray_device_key = RAY_CPU_RESOURCE
    ray_executor_v2.RayWorkerProc = CpuRayWorkerProc
