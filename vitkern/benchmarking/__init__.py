"""The machinery behind ``vitkern bench`` and ``vitkern profile``.

- :mod:`.cases`: benchmark cases from real model shapes (built-in table or a timm model walk);
- :mod:`.peers`: the implementations compared per op (vitkern, eager reference, timm, SDPA,
  FlexAttention, FlashAttention/xformers on CUDA), each either runnable or saying why not;
- :mod:`.timing`: interleaved timing rounds (CPU: ``time.perf_counter``; CUDA:
  ``triton.testing.do_bench``) with median and IQR;
- :mod:`.memory`: peak memory of one call (CPU: allocator events recorded by torch.profiler;
  CUDA: ``max_memory_allocated``);
- :mod:`.machine`: the device's measured roofline (bandwidth by a large copy, matmul rate);
- :mod:`.runner`: runs cases x peers and computes speedups and roofline fractions;
- :mod:`.report`, :mod:`.plot`, :mod:`.static`, :mod:`.progress`: output.
"""
