// edgeq-run-concurrency: runs one loaded model from many threads at once and checks every result against one
// thread's (tests/test_hardening_cpp.py).
//
//   edgeq-run-concurrency MODEL.edgeq INPUT.npy THREADS CALLS
//
// Loads MODEL, runs it once on INPUT for the expected outputs, then starts THREADS threads that each run it CALLS
// times on the same Model. Prints "THREADS threads x CALLS calls: all equal" and exits 0, or names the first call
// that differed (or failed) and exits 1.
#include <atomic>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "edgeq/runtime.h"
#include "npy.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: edgeq-run-concurrency MODEL.edgeq INPUT.npy THREADS CALLS\n";
    return 2;
  }
  int threads = std::stoi(argv[3]), calls = std::stoi(argv[4]);
  try {
    edgeq::Model model = edgeq::Model::Load(argv[1]);
    std::vector<edgeq::HostTensor> inputs = {edgeq::ReadNpy(argv[2], model.Inputs().at(0))};
    std::vector<edgeq::HostTensor> expected = model.Run(inputs);
    std::mutex mutex;
    std::string first_problem;
    std::atomic<int> done{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        for (int call = 0; call < calls; ++call) {
          std::string problem;
          try {
            std::vector<edgeq::HostTensor> got = model.Run(inputs);
            for (size_t i = 0; i < expected.size() && problem.empty(); ++i) {
              if (got.at(i).data != expected[i].data) problem = "output " + std::to_string(i) + " differs";
            }
          } catch (const std::exception& error) {
            problem = error.what();
          }
          if (!problem.empty()) {
            std::lock_guard<std::mutex> lock(mutex);
            if (first_problem.empty()) first_problem = "thread " + std::to_string(t) + " call " + std::to_string(call) + ": " + problem;
            return;
          }
          ++done;
        }
      });
    }
    for (std::thread& worker : workers) worker.join();
    if (!first_problem.empty()) {
      std::cerr << "edgeq-run-concurrency: " << first_problem << "\n";
      return 1;
    }
    std::cout << threads << " threads x " << calls << " calls: all equal (" << done << " runs)\n";
  } catch (const std::exception& error) {
    std::cerr << "edgeq-run-concurrency: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
