// See crash_report.h. Everything the handler calls is async-signal-safe (sigaction, raise,
// lseek, write, ftruncate, and our own formatting into a static buffer).
#include "crash_report.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace em::addon {
namespace {

constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
constexpr size_t kMaxMessage = 1024;  // well under the kubelet's 4096 bytes

std::atomic<const char*> g_op{nullptr};
std::atomic<const char*> g_device{"cpu"};
int g_fd = -1;
struct sigaction g_prev[NSIG];
std::atomic<bool> g_installed{false};

// A message assembled without the C library's formatting (not async-signal-safe).
struct Line {
  char text[kMaxMessage];
  size_t n = 0;
  void put(const char* s) {
    while (s != nullptr && *s != '\0' && n + 1 < sizeof text) text[n++] = *s++;
  }
  void put_dec(long long v) {
    char digits[24];
    int k = 0;
    const bool neg = v < 0;
    unsigned long long u = neg ? 0ull - static_cast<unsigned long long>(v) : static_cast<unsigned long long>(v);
    do {
      digits[k++] = static_cast<char>('0' + u % 10);
      u /= 10;
    } while (u != 0 && k < 23);
    if (neg) put("-");
    while (k > 0 && n + 1 < sizeof text) text[n++] = digits[--k];
  }
  void put_hex(unsigned long long u) {
    char digits[20];
    int k = 0;
    do {
      digits[k++] = "0123456789abcdef"[u & 15];
      u >>= 4;
    } while (u != 0 && k < 19);
    put("0x");
    while (k > 0 && n + 1 < sizeof text) text[n++] = digits[--k];
  }
};

const char* signal_name(int sig) {
  switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGBUS: return "SIGBUS";
    case SIGILL: return "SIGILL";
    case SIGFPE: return "SIGFPE";
    case SIGABRT: return "SIGABRT";
    default: return "a fatal signal";
  }
}

// A signal kill() or raise() sent (abort() raises SIGABRT), not a fault of the thread itself.
bool sent(const siginfo_t* si) { return si == nullptr || si->si_code <= 0; }

void report(int sig, const siginfo_t* si) {
  static Line line;  // static: the handler's stack may be small
  line.n = 0;
  line.put("[EM_NATIVE_CRASH] ");
  line.put(signal_name(sig));
  if (si != nullptr && !sent(si) && sig != SIGABRT) {
    line.put(" (address ");
    line.put_hex(reinterpret_cast<unsigned long long>(si->si_addr));
    line.put(")");
  } else if (si != nullptr && si->si_code == SI_USER && si->si_pid != getpid()) {
    line.put(" (sent by process ");
    line.put_dec(si->si_pid);
    line.put(")");
  }
  const char* op = g_op.load(std::memory_order_relaxed);
  if (op != nullptr) {
    line.put(" while the native engine ran ");
    line.put(op);
    line.put(" on ");
    line.put(g_device.load(std::memory_order_relaxed));
    line.put(": a bug in the native engine or its device; the log's lines before this one say what it was serving");
  } else {
    line.put(" outside the native engine's ops: a fatal error of Node.js (such as a JavaScript heap out of "
             "memory) or of a native module; the log's lines before this one say which");
  }
  line.put("\n");
  if (g_fd >= 0 && lseek(g_fd, 0, SEEK_SET) == 0) {
    const ssize_t w = write(g_fd, line.text, line.n);
    if (w >= 0) (void)!ftruncate(g_fd, w);
  }
  (void)!write(STDERR_FILENO, line.text, line.n);
}

bool is_handler(const struct sigaction& a) {
  return (a.sa_flags & SA_SIGINFO) != 0 ? a.sa_sigaction != nullptr
                                        : a.sa_handler != SIG_DFL && a.sa_handler != SIG_IGN;
}

bool same_handler(const struct sigaction& a, const struct sigaction& b) {
  if (((a.sa_flags ^ b.sa_flags) & SA_SIGINFO) != 0) return false;
  return (a.sa_flags & SA_SIGINFO) != 0 ? a.sa_sigaction == b.sa_sigaction : a.sa_handler == b.sa_handler;
}

void on_fatal(int sig, siginfo_t* si, void* uc) {
  const struct sigaction& prev = g_prev[sig];
  if (is_handler(prev)) {
    // The previous handler first, installed again so that it finds its own disposition: it
    // either handles the signal (Node's WebAssembly trap handler turns an out-of-bounds access
    // into an exception: nothing to report) or gives up, resetting the disposition (and
    // raising a signal that was sent, pending until this handler returns).
    struct sigaction ours;
    sigaction(sig, &prev, &ours);
    if ((prev.sa_flags & SA_SIGINFO) != 0) prev.sa_sigaction(sig, si, uc);
    else prev.sa_handler(sig);
    struct sigaction now;
    sigaction(sig, nullptr, &now);
    if (same_handler(now, prev)) {
      sigaction(sig, &ours, nullptr);
      return;
    }
    report(sig, si);
    return;  // its disposition stays: the fault again, or the pending signal, ends the process
  }
  report(sig, si);
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(sig, &dfl, nullptr);
  // A fault runs its instruction again on return, now with the default action; a signal
  // that was sent is sent again (blocked until this handler returns).
  if (sent(si)) raise(sig);
}

}  // namespace

bool install_crash_report() {
  if (g_installed.load()) return true;
  const char* env = std::getenv("EM_TERMINATION_LOG");
  const char* path = env != nullptr && *env != '\0' ? env : "/dev/termination-log";
  struct stat st;
  if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return false;
  const int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  if (g_installed.exchange(true)) {
    close(fd);
    return true;
  }
  g_fd = fd;
  // An alternate stack for this thread (the one that runs the ops) when it has none: a stack
  // overflow in native code still gets its message.
  stack_t old;
  if (sigaltstack(nullptr, &old) == 0 && (old.ss_flags & SS_DISABLE) != 0) {
    static constexpr size_t kAltStack = 64 * 1024;
    void* mem = std::malloc(kAltStack);  // kept for the process's life
    if (mem != nullptr) {
      stack_t ss;
      ss.ss_sp = mem;
      ss.ss_size = kAltStack;
      ss.ss_flags = 0;
      if (sigaltstack(&ss, nullptr) != 0) std::free(mem);
    }
  }
  for (const int sig : kSignals) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fatal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, &g_prev[sig]);
  }
  return true;
}

void crash_report_enter(const char* op) { g_op.store(op, std::memory_order_relaxed); }
void crash_report_leave() { g_op.store(nullptr, std::memory_order_relaxed); }
void crash_report_device(const char* device) {
  // A copy that lives for the process (configure runs a few times in a process's life).
  const size_t n = std::strlen(device);
  char* copy = static_cast<char*>(std::malloc(n + 1));
  if (copy == nullptr) return;
  std::memcpy(copy, device, n + 1);
  g_device.store(copy, std::memory_order_relaxed);
}

}  // namespace em::addon
