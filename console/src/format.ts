// Display helpers: local times as HH:MM:SS, ages, vital formatting.
import { useEffect, useState } from 'react';

const pad = (n: number) => String(n).padStart(2, '0');

export function clock(ms: number): string {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** Date and time, for things older than today. */
export function dateTime(ms: number): string {
  const d = new Date(ms);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const date = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  return sameDay ? clock(ms) : `${date} ${clock(ms)}`;
}

export function age(ms: number, now: number): string {
  let s = Math.max(0, Math.floor((now - ms) / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  s %= 60;
  if (m < 60) return `${m}m ${pad(s)}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${pad(m % 60)}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

export const nsToMs = (ns: number) => Math.floor(ns / 1e6);

export function fmt(v: number | undefined, digits = 0): string {
  if (v === undefined || v === null || Number.isNaN(v)) return '–';
  return v.toFixed(digits);
}

/** The current time, refreshed every `ms`; only components that show ages use it. */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    const id = window.setInterval(() => setNow(Date.now()), ms);
    return () => window.clearInterval(id);
  }, [ms]);
  return now;
}
