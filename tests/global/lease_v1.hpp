// The lease script of the previous protocol (before the protocol clock: refill, expiry and fence
// in Redis's TIME; state under lim:global:{K}), exactly as lim-feeder ran it, kept here so that
// tests can run feeders of both versions against one Redis (docs/global.md, "Rolling upgrade").
// KEYS: lim:global:{K}, lim:global:{K}:leases. ARGV and reply as tools/feeder/scripts.hpp's first
// version.
#pragma once

namespace lim::test {

inline constexpr const char* kLeaseScriptV1 = R"lua(
local host = ARGV[1]
local held = tonumber(ARGV[2])
local returned = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local burst = tonumber(ARGV[6])
local rate = tonumber(ARGV[7])
local grace = tonumber(ARGV[8])
local weight = tonumber(ARGV[9] or '') or want
if want <= 0 then weight = 0 end
local id = ARGV[10] or ''
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
local st = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'fence', 'run', 'ttl', 'grace')
local live = st[2] and st[4] == run
local tokens, ts, fence
if not live then
  tokens = 0
  ts = now
  fence = now + ttl + grace
else
  tokens = tonumber(st[1])
  ts = tonumber(st[2])
  fence = tonumber(st[3])
end
local outstanding = 0
local weights = weight
local others = 0
local mine = nil
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local a, e, w, g, o = string.match(all[i + 1], '^(%d+):(%d+):(%d+):?(%d*):?(%x*)$')
  local amount = tonumber(a) or 0
  local expiry = tonumber(e) or 0
  if expiry <= now then
    redis.call('HDEL', KEYS[2], all[i])
  elseif all[i] == host then
    if o ~= '' and id ~= '' and o ~= id then
      return redis.error_reply('LIMHOST another feeder (instance ' .. o .. ') holds a lease as host ' .. host .. ': give every feeder its own host name')
    end
    mine = amount
  else
    outstanding = outstanding + amount
    others = others + 1
    if (tonumber(w) or 0) > 0 then weights = weights + (tonumber(g) or tonumber(w) or 0) end
  end
end
if live and others > 0 and st[5] and (tonumber(st[5]) ~= ttl or tonumber(st[6]) ~= grace) then
  return redis.error_reply('LIMTTL lease_ttl ' .. ttl .. ' us (grace ' .. grace .. ') differs from the ' .. st[5] .. ' us (grace ' .. (st[6] or '?') .. ') the other hosts hold leases under: give every host the same lease_ttl')
end
if now > ts then
  if now > fence then
    tokens = tokens + (now - math.max(ts, fence)) * rate / 1000000
  end
  ts = now
end
local keep
if mine ~= nil then
  keep = math.min(held, mine)
  tokens = tokens + math.min(returned, mine - keep)
else
  keep = math.min(held, math.max(0, burst - outstanding - tokens))
end
keep = math.max(0, math.floor(keep))
tokens = math.max(0, math.min(tokens, burst - outstanding - keep))
-- While others want too, a host gets its share of the bucket in proportion to its weight (its
-- demand), never more than it wants. The shares of the hosts that want sum to at most the bucket.
local granted = 0
if now > fence and weights > 0 then
  granted = math.max(0, math.min(want, math.floor(tokens * weight / weights)))
end
tokens = tokens - granted
local lease = keep + granted
if lease > 0 then
  redis.call('HSET', KEYS[2], host,
             string.format('%d:%d:%d:%d:%s', lease, now + ttl + grace, want, weight, id))
elseif want > 0 then
  redis.call('HSET', KEYS[2], host,
             string.format('0:%d:%d:%d:%s', now + ttl + grace, want, weight, id))
else
  redis.call('HDEL', KEYS[2], host)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.4f', tokens), 'ts', string.format('%d', ts),
           'fence', string.format('%d', fence), 'run', run, 'ttl', string.format('%d', ttl),
           'grace', string.format('%d', grace))
return {keep, granted, now}
)lua";

}  // namespace lim::test
