// Why a process died of a fatal signal, where Kubernetes looks for it (ADR 0036's amendment
// of 2026-12-04): a fault or an abort in the native engine, or a fatal error of Node.js itself
// (out of memory), kills the process before any JavaScript can write its termination message.
// The addon installs handlers for SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGABRT when the
// termination-log file exists (a pod's /dev/termination-log, or $EM_TERMINATION_LOG), that
// write one line there and to stderr —
//
//   [EM_NATIVE_CRASH] SIGSEGV (address 0x10) while the native engine ran moeFfn on cuda:0; ...
//
// — and then let the signal kill the process as it would have. Handlers that were installed
// before (Node's WebAssembly trap handler for SIGSEGV) run first: a fault they handle (a
// WebAssembly out-of-bounds access, which becomes a JavaScript exception) writes nothing.
#pragma once

namespace em::addon {

// Installs the handlers once per process when the termination-log file exists; returns
// whether they are installed.
bool install_crash_report();

// The op running now (a static string; nullptr between ops) and the device ops run on, for
// the message. Cheap enough for every call: one atomic store each.
void crash_report_enter(const char* op);
void crash_report_leave();
void crash_report_device(const char* device);

}  // namespace em::addon
