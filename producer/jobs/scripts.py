"""Every Lua script atelier runs in Redis, in one place (as its keys are in
:mod:`producer.core.keys`).

A script is how a check and the writes it guards happen in one step: Redis runs it
whole, with nothing interleaved. The store's scripts (:class:`producer.jobs.store.JobStore`)
come first, then the idempotency key's, the dispatcher's and the API's rate limit.

Most scripts name their keys in ``KEYS``. The job list's sets are the exception: which
sets a job is in follows from its owner, kind, model and status, read inside the
script, so their names are built there from :data:`producer.core.keys.JOB_LIST`
(atelier runs on one Redis, or a Sentinel-managed primary; not on Redis Cluster).
"""

from producer.core import keys as K

#: Shared by the scripts below: Redis's own clock (one clock for every worker's lease,
#: whatever their hosts' clocks say) and the terminal statuses.
PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function is_terminal(s)
  return s == 'succeeded' or s == 'failed' or s == 'cancelled' or s == 'expired'
end
"""

#: The job list (producer/jobs/joblist.py). A job's *entry* is
#: ``<member>\t<owner>\t<kind>\t<model>``; it is in the 8 sets of its owner that its
#: status, kind and model match (each filter given or ``*``). ``list_prune`` takes out of
#: the list up to ``budget`` finished jobs whose records have expired.
JOB_LIST = (
    f"""
local LIST, JOB, EXPIRY = '{K.JOB_LIST}', '{K.JOB}', '{K.JOB_LIST_EXPIRY}'
"""
    + """
local function list_sets(entry, status, op)
  local member, owner, kind, model = string.match(entry, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
  if not member then return end
  local base = LIST .. owner .. ':' .. status .. ':'
  for _, key in ipairs({base .. '*:*', base .. kind .. ':*', base .. '*:' .. model,
                        base .. kind .. ':' .. model}) do
    if op == 'add' then redis.call('ZADD', key, 0, member) else redis.call('ZREM', key, member) end
  end
end
-- A status change: out of the old status's sets, into the new one's. The sets of any
-- status are written each time too (a no-op but for a job from before the list).
local function list_move(entry, old, new)
  list_sets(entry, '*', 'add')
  if old then list_sets(entry, old, 'rem') end
  list_sets(entry, new, 'add')
end
local function list_prune(now, budget)
  local due = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now, 'LIMIT', 0, budget)
  for _, item in ipairs(due) do
    local status, entry = string.match(item, '^([^\t]*)\t(.*)$')
    list_sets(entry, '*', 'rem')
    list_sets(entry, status, 'rem')
    redis.call('ZREM', EXPIRY, item)
  end
  return #due
end
"""
)

APPLY = (
    PRELUDE
    + JOB_LIST
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if ARGV[1] == '__new__' then
  if status then return {0, status} end
  -- An Idempotency-Key already naming a job: a concurrent request with it won.
  if ARGV[11] ~= '' and redis.call('EXISTS', KEYS[5]) == 1 then return {0, 'claimed'} end
else
  if not status then return {0, '__missing__'} end
  -- A terminal record never changes, whatever the caller allows.
  if is_terminal(status) then return {0, status} end
  local allowed = false
  for s in string.gmatch(ARGV[1], '[^,]+') do
    if s == status then allowed = true end
  end
  if not allowed then return {0, status} end
  local token = redis.call('HGET', KEYS[1], 'token') or 'none'
  -- A fresh token already in place means this very call ran and its reply was lost:
  -- answer as it did, so a retried call does not look fenced.
  if ARGV[4] ~= '' and ARGV[4] ~= 'none' and token == ARGV[4] then return {1, 'replayed'} end
  if ARGV[2] ~= '*' and token ~= ARGV[2] then return {0, 'fenced'} end
  -- The lease: 'held:<worker>' (a start: this worker holds the job's message), or
  -- 'expired:<worker>|<tag>' (a take-back: that lease, and it has run out).
  if ARGV[13] ~= '' then
    local holder = redis.call('HGET', KEYS[1], 'lease') or ''
    local mode, want = string.match(ARGV[13], '^(%a+):(.*)$')
    if mode == 'held' then
      if holder ~= want then return {0, 'fenced'} end
    else
      local tag = redis.call('HGET', KEYS[1], 'tag') or ''
      local expiry = redis.call('ZSCORE', KEYS[6], ARGV[9])
      if holder .. '|' .. tag ~= want then return {0, 'lease_changed'} end
      if expiry and tonumber(expiry) > now_ms() then return {0, 'lease_renewed'} end
    end
  end
end
-- Events first: an XADD with an explicit id is the only call here that can fail, and
-- a failure must leave the record as it was. Each event is three arguments: its type,
-- its data for the job's own log, and its data for the global stream ('' when the
-- same; a preview picture rides only in the job's log).
local ids = {}
for i = 16, #ARGV, 3 do
  local shared = ARGV[i + 2]
  if shared == '' then shared = ARGV[i + 1] end
  local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*',
                        'type', ARGV[i], 'job_id', ARGV[9], 'ts', ARGV[6], 'data', shared)
  redis.call('XADD', KEYS[2], id,
             'type', ARGV[i], 'job_id', ARGV[9], 'ts', ARGV[6], 'data', ARGV[i + 1])
  table.insert(ids, id)
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'status', ARGV[3])
  -- The queue index holds exactly the jobs waiting for a worker.
  if ARGV[3] ~= 'queued' then redis.call('ZREM', KEYS[4], ARGV[9]) end
  -- The job list (ARGV[15]: the job's entry) follows the status in the same step; a
  -- finished job leaves it when its record expires.
  if ARGV[15] ~= '' and ARGV[3] ~= status then
    list_move(ARGV[15], status, ARGV[3])
    if is_terminal(ARGV[3]) and tonumber(ARGV[7]) > 0 then
      redis.call('ZADD', EXPIRY, now_ms() + tonumber(ARGV[7]) * 1000, ARGV[3] .. '\t' .. ARGV[15])
      list_prune(now_ms(), 4)
    end
  end
end
if string.sub(ARGV[13], 1, 8) == 'expired:' or is_terminal(ARGV[3]) then
  -- Taken back, or ended: nobody holds the job any more.
  redis.call('HDEL', KEYS[1], 'lease', 'tag')
  redis.call('ZREM', KEYS[6], ARGV[9])
end
-- A new queued job, or one taken back from a lost worker, waits in its queue again.
if ARGV[10] ~= '' and not is_terminal(ARGV[3]) then
  redis.call('ZADD', KEYS[4], ARGV[10], ARGV[9])
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'token', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'doc', ARGV[5]) end
if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'announced', ARGV[14]) end
-- The key and the record it names appear together or not at all.
if ARGV[11] ~= '' then redis.call('SET', KEYS[5], ARGV[11], 'EX', ARGV[12]) end
if tonumber(ARGV[7]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
return {1, table.concat(ids, ',')}
"""
)

# A worker took the job's message: lease it, unless another worker holds it (then the
# message is a duplicate and is dropped; the holder's lease, or the reconciler when it
# runs out, decides what happens to the job). Returns the hash, to start from.
HOLD = (
    PRELUDE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'__missing__'} end
if is_terminal(status) then return {status} end
local holder = redis.call('HGET', KEYS[1], 'lease')
if holder and holder ~= ARGV[1] then return {'held', holder} end
redis.call('HSET', KEYS[1], 'lease', ARGV[1], 'tag', ARGV[2])
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[3]), ARGV[4])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# The heartbeat: every job this worker still holds gets ARGV[2] ms more.
RENEW = (
    PRELUDE
    + """
local expiry = now_ms() + tonumber(ARGV[2])
local renewed = 0
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'lease') == ARGV[1] then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i + 1])
    renewed = renewed + 1
  end
end
return renewed
"""
)

# The worker lets go of a job it did not end (given back at shutdown, or dropped).
RELEASE = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'tag') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'lease', 'tag')
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""

FLAG_CANCEL = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('RPUSH', KEYS[2], '1')
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""

# Idempotency-Key: delete a key only if it still holds what the caller read (the record
# it named has expired; a key naming a newer job is left alone).
RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The dispatcher: take up to ARGV[3] webhook retries due by ARGV[1] (ms), leasing each
# until ARGV[2].
CLAIM_RETRIES = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
"""

# The API's per-key rate limit. Generic cell rate algorithm: one timestamp per key, on
# Redis's clock so replicas agree. Returns 0 (allowed) or the ms to wait.
RATE_LIMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - now - burst * interval
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return 0
"""


# A page of the job list: up to ARGV[2] members of the set KEYS[1] after the cursor
# ARGV[1] ('' from the newest), newest first, each with its record; ARGV[3] expired
# jobs pruned first. A member whose record is gone anyway (evicted under maxmemory) is
# dropped from this set and skipped, a bounded number of times.
LIST_PAGE = (
    PRELUDE
    + JOB_LIST
    + """
list_prune(now_ms(), tonumber(ARGV[3]))
local want = tonumber(ARGV[2])
local from = '+'
if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
local out, found, dropped = {}, 0, 0
while found < want and dropped < 1000 do
  local batch = redis.call('ZRANGE', KEYS[1], from, '-', 'BYLEX', 'REV', 'LIMIT', 0, want - found)
  if #batch == 0 then break end
  for _, member in ipairs(batch) do
    local id = string.match(member, '^%d+:(.*)$')
    local doc = id and redis.call('HGET', JOB .. id, 'doc')
    if doc then
      table.insert(out, member)
      table.insert(out, doc)
      found = found + 1
    else
      redis.call('ZREM', KEYS[1], member)
      dropped = dropped + 1
    end
    from = '(' .. member
  end
end
return out
"""
)
