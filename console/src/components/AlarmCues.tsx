// Sound cues and screen-reader announcements for alerts as they arrive on the stream.
import { useCallback, useEffect, useRef, useState } from 'react';
import { nsToMs } from '../format';
import { cue, disableAudio, enableAudio } from '../sound';
import { useStore } from '../stream';
import { PRIORITY_RANK, type Alert } from '../types';

export type SoundControl = { on: boolean; toggle: () => void };

// Transitions older than this (e.g. the open alerts replayed on connect) make no sound.
const FRESH_MS = 15_000;
const HIGH_REPEAT_MS = 10_000;

function isNewCue(a: Alert, prev: Alert | undefined): boolean {
  if (prev && prev.seq >= a.seq) return false;
  if (a.event === 'raised' || a.event === 'escalated') return true;
  // A rise in priority is treated like a fresh alarm at the new level.
  return a.event === 'reprioritized' && !!prev && PRIORITY_RANK[a.priority] > PRIORITY_RANK[prev.priority];
}

const sounding = (a: Alert) => a.priority === 'high' && (a.state === 'active' || a.state === 'escalated');

export function AlarmCues({ children }: { children: (s: SoundControl) => React.ReactNode }) {
  const store = useStore();
  const [on, setOn] = useState(false);
  const onRef = useRef(on);
  useEffect(() => {
    onRef.current = on;
  }, [on]);
  const [announcement, setAnnouncement] = useState('');

  useEffect(
    () =>
      store.onAlert((a, prev) => {
        if (!isNewCue(a, prev)) return;
        if (Date.now() - nsToMs(a.at_ns) > FRESH_MS) return;
        if (onRef.current) cue(a.priority);
        if (a.priority === 'high') {
          const where = [a.unit, a.bed && `bed ${a.bed}`, a.patient && `patient ${a.patient}`]
            .filter(Boolean)
            .join(', ');
          const what = a.event === 'escalated' ? `escalated to tier ${a.tier}` : 'raised';
          setAnnouncement(`High priority alert ${what}: ${a.description || a.rule}${where ? ` (${where})` : ''}`);
        }
      }),
    [store],
  );

  // Repeat the high-priority burst while any high alert is unacknowledged and not silenced.
  useEffect(() => {
    if (!on) return;
    const id = window.setInterval(() => {
      for (const a of store.openAlerts()) {
        if (sounding(a)) {
          cue('high');
          return;
        }
      }
    }, HIGH_REPEAT_MS);
    return () => window.clearInterval(id);
  }, [on, store]);

  const toggle = useCallback(() => {
    setOn((was) => {
      if (was) disableAudio();
      // A single soft tone confirms that audio works.
      else void enableAudio().then(() => cue('low'));
      return !was;
    });
  }, []);

  return (
    <>
      {children({ on, toggle })}
      <div className="visually-hidden" aria-live="polite" role="status">
        {announcement}
      </div>
    </>
  );
}
