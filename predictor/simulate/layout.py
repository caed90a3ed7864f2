"""The replay engine's array layout: parameter, state and output indices, shared by engine.py,
evict.py and run.py (numba functions pass arrays, so these name their slots)."""

NO_PREFETCH, PREDICTED, ORACLE = 0, 1, 2  # prefetch sources
TOKEN_AHEAD, LAYER_AHEAD, ZERO_LATENCY = 0, 1, 2  # when a prediction is known

# int counters (the `counts` output)
C_HITS, C_DEMAND, C_ISSUED, C_USED, C_LATE, C_WASTED, C_CANCELLED, C_CPU, C_BYPASS, C_REJECTED = range(10)
N_COUNTS = 10
# float outputs (the `times` output)
T_STALL, T_GPU, T_ELAPSED, T_HOST, T_CPU = range(5)
N_TIMES = 5
# float params (`fp`)
(P_COPY, P_LAYER, P_EXPERT, P_HOST_LAYER, P_HOST_EXPERT, P_COPY_ISSUE, P_PRED_STEP, P_PRED_LAYER,
 P_PRED_LAT, P_CPU, P_LINK_W, P_QMIN, P_MIN_P, P_HOST_ROUTE) = range(14)
N_FP = 14
# int params (`ip`)
(I_EVICT, I_SOURCE, I_MODE, I_LEAD, I_ADMIT, I_INFLIGHT, I_BYPASS, I_HYBRID, I_WARM_ALL, I_DEMAND_FIRST, I_SAMPLE,
 I_HORIZON) = range(12)
N_IP = 12
# scalar state: floats (`f`) and ints (`n`)
F_H, F_G, F_LINK, F_CPU_FREE, F_STAMP = range(5)
N_QH, N_QT, N_IH, N_IT, N_TOK, N_TOK0 = range(6)

_NEG = -1e18
