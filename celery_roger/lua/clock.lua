-- Prepended by store_base.py to every script, lean ones too (before lib.lua).
-- The current time by Redis's own clock: in ms (now_ms), in µs (now_us), in seconds with
-- a fraction (now_s).
local function now_us()
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]
end
local function now_ms()
  return math.floor(now_us() / 1000)
end
local function now_s()
  return now_us() / 1000000
end
