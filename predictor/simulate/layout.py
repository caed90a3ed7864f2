"""The replay engine's array layout: parameter, state and output indices, shared by engine.py,
prefetch.py, evict.py, lfu.py and run.py (numba functions pass arrays, so these name their slots and
columns). The state is packed into a few tables: each array argument of a compiled call is passed
as its seven or so fields, so fewer arrays make each call of the replay's helpers cheaper."""

NO_PREFETCH, PREDICTED, ORACLE = 0, 1, 2  # prefetch sources
# when a prediction is known: at the token's start, once layer l - h has routed, just before use, or
# once layer l - 1 has run (its output: the cross-layer gate)
TOKEN_AHEAD, LAYER_AHEAD, ZERO_LATENCY, LAYER_OUTPUT = 0, 1, 2, 3

# int counters (the `counts` output)
C_HITS, C_DEMAND, C_ISSUED, C_USED, C_LATE, C_WASTED, C_CANCELLED, C_CPU, C_BYPASS, C_REJECTED = range(10)
N_COUNTS = 10
# float outputs (the `times` output)
T_STALL, T_GPU, T_ELAPSED, T_HOST, T_CPU = range(5)
N_TIMES = 5
# float params (`fp`)
(P_COPY, P_LAYER, P_EXPERT, P_HOST_LAYER, P_HOST_EXPERT, P_COPY_ISSUE, P_PRED_STEP, P_PRED_LAYER,
 P_PRED_LAT, P_CPU, P_LINK_W, P_QMIN, P_MIN_P, P_HOST_ROUTE, P_STEP_LAT, P_CPU_HANDOFF, P_CPU_HOST_SHARE) = range(17)
N_FP = 17
# int params (`ip`)
# (I_NEXT_BASE: the base of Belady's packed next uses, Accesses.next_uses)
(I_EVICT, I_SOURCE, I_MODE, I_LEAD, I_ADMIT, I_INFLIGHT, I_BYPASS, I_HYBRID, I_WARM_ALL, I_DEMAND_FIRST, I_SAMPLE,
 I_HORIZON, I_LINK_LOAD, I_NEXT_BASE, I_CPU_ASYNC) = range(15)
N_IP = 15
# per slot, `si` (3, S) int64: its key (-1: free), the row it is kept for (pend; -1: none), 1 while it
# holds a prefetch not used yet; `sv` (3, S) float: when its copy lands, when the compute that last read
# it has run, its last use (a stamp; _NEG + stamp once cold). The LRU list and the LFU heaps: evict.py.
S_KEY, S_PEND, S_UNUSED = range(3)
V_LAND, V_FREE, V_LAST = range(3)
# the key table `kt` (L * E, K_COLS) int64: the key's slot (-1: not resident), uses, next uses (Belady's
# rows, packed: Accesses.next_uses), the last row that routed it, the row of its latest prediction, the
# token of its last use, its layer
K_SLOT, K_CNT, K_NEXT, K_MARK, K_ROW, K_TOK, K_LAYER = range(7)
K_COLS = 7
# the prefetch queue: `qi` (qcap, 2) int64 (key, row), `qf` (qcap, 2) float (ready time, probability)
Q_KEY, Q_ROW = 0, 1
Q_READY, Q_P = 0, 1
# scalar state: floats (`f`) and ints (`n`: the prefetch queue's head and tail, the copies in flight's,
# the token, the sequence's first token; then evict._rated_victim's ranking: how many in each list, how
# many taken (-1: no ranking), whether it ranked kept slots, its group's first slot, its prot_row, the
# victim it gave last, its length; the running sequence's end row)
# (F_LOAD: the link's busy share over recent tokens, smoothed; F_COPIES: copies counted at the last token start;
# F_ROUTED_ROW, F_ROUTED_AT: the last row whose routing the host has read, and when)
# F_WORKER, F_STEP_END: when a predictor worker (P_STEP_LAT > 0) is done with what it has been sent, and
# with its last token's step (a step is never skipped)
F_H, F_G, F_LINK, F_CPU_FREE, F_STAMP, F_LOAD, F_COPIES, F_ROUTED_ROW, F_ROUTED_AT, F_WORKER, F_STEP_END = range(11)
N_F = 11
N_QH, N_QT, N_IH, N_IT, N_TOK, N_TOK0, N_C0, N_C1, N_CI, N_CK, N_CG, N_CP, N_CH, N_CM, N_END = range(15)
N_N = 15

_NEG = -1e18
